// Linking against libtorch is torch-sys's job (it finds the libraries of the `torch` in the
// active Python environment when LIBTORCH_USE_PYTORCH=1). At import time `cast_rs` imports
// torch first, so the loader reuses the already-loaded libtorch by soname. The rpath below is
// a fallback for loading the extension on its own, and it is *relative* to the installed
// extension (site-packages/cast_rs/ -> site-packages/torch/lib), so a wheel built here works
// in any other environment.
//
// With the `python` feature this also compiles `csrc/` (the PyTorch operator registrations)
// against the same libtorch: torch-sys passes its library directory to direct dependents as
// DEP_TCH_LIBTORCH_LIB (`links = "tch"`), and the headers sit next to it in the torch package
// (`torch/lib` -> `torch/include`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let python = std::env::var_os("CARGO_FEATURE_PYTHON").is_some();
    let linux = std::env::var("CARGO_CFG_TARGET_OS")
        .map(|os| os == "linux")
        .unwrap_or(false);
    if python && linux {
        println!("cargo:rustc-link-arg-cdylib=-Wl,-rpath,$ORIGIN/../torch/lib");
    }
    if python {
        compile_operators();
    }
}

fn compile_operators() {
    // The operator registrations and the multi-tensor (`_foreach_*`) AdamS step of the
    // generic path.
    const SOURCES: [&str; 2] = ["csrc/cast_rs_ops.cpp", "csrc/adams_foreach.cpp"];
    for source in SOURCES {
        println!("cargo:rerun-if-changed={source}");
    }
    println!("cargo:rerun-if-changed=csrc/adams_foreach.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not report its libtorch directory (DEP_TCH_LIBTORCH_LIB)"),
    );
    let include = lib
        .parent()
        .expect("libtorch directory has a parent")
        .join("include");
    // Every torch wheel since 2.7 (this crate needs 2.13) is built with the C++11 ABI;
    // LIBTORCH_CXX11_ABI=0 (torch-sys's variable) is for a libtorch built without it.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    // Python.h, for the operators' errors: raised as the same Python exception objects (class
    // and fields) that the Rust side builds, through pybind11 (torch/include/pybind11).
    let python_include = python_include();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("GLOG_USE_GLOG_EXPORT", None)
        // The torch headers as system headers: warnings are ours only.
        .flag("-isystem")
        .flag(include.to_str().expect("utf-8 include path"))
        .flag("-isystem")
        .flag(
            include
                .join("torch/csrc/api/include")
                .to_str()
                .expect("utf-8 include path"),
        )
        .flag("-isystem")
        .flag(&python_include)
        .warnings(true)
        .extra_warnings(true)
        .files(SOURCES);
    build.compile("cast_rs_ops");
}

/// The include directory of the building interpreter (the `python3` that torch-sys also runs:
/// the build backend puts it first on `PATH`; `PYO3_PYTHON` overrides, as for pyo3).
fn python_include() -> String {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let python = std::env::var("PYO3_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['include'])",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running {python} to find Python.h: {e}"));
    assert!(
        out.status.success(),
        "{python} could not report its include directory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8 include path")
        .trim()
        .to_string()
}
