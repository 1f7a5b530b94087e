// Linking against libtorch is torch-sys's job (it finds the libraries of the `torch` in the
// active Python environment when LIBTORCH_USE_PYTORCH=1). At import time `cast_rs` imports
// torch first, so the loader reuses the already-loaded libtorch by soname. The rpath below is
// a fallback for loading the extension on its own, and it is *relative* to the installed
// extension (site-packages/cast_rs/ -> site-packages/torch/lib), so a wheel built here works
// in any other environment.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let python = std::env::var_os("CARGO_FEATURE_PYTHON").is_some();
    let linux = std::env::var("CARGO_CFG_TARGET_OS")
        .map(|os| os == "linux")
        .unwrap_or(false);
    if python && linux {
        println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    }
}
