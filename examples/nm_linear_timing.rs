//! Throughput of the compressed 2:4 linear kernels at batch 1, one thread, without Python or
//! the dispatcher: `cargo run --release --example nm_linear_timing` (`RAYON_NUM_THREADS`
//! sets the threads of the bf16 x bf16 row, 1 by default).
//!
//! Two sizes: a weight that fits in the L2 cache (what the kernel's instructions allow) and
//! (4096, 4096) weights rotated through copies covering twice the last-level cache, at least
//! 256 MiB (what memory allows; the cache size from sysfs, or `CAST_RS_LLC_MIB`). Printed as
//! dense weights per nanosecond and as compressed bytes read per second: a kernel much slower
//! from memory than from L2 while below the memory bandwidth is waiting on memory, not on its
//! instructions (the case the prefetch distance in `nm_linear::x86` is for).
use std::time::Instant;

use _cast_rs::nm_linear::{
    compress, compress_int8, level, nm_linear_bf16_parallel, run_blocks, Bf16, NmElem, NmLayout,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// A random 2:4 `[rows, cols]` weight (the first two of every four kept).
fn weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..rows * cols)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if (i % 4) < 2 {
                v
            } else {
                0.0
            }
        })
        .collect()
}

/// Median seconds of one call of `call(copy)` over the copies, after 5 warm-up rounds.
fn timed<C>(copies: &[C], mut call: impl FnMut(&C)) -> f64 {
    let mut times = Vec::new();
    for round in 0..40 {
        let t0 = Instant::now();
        for c in copies {
            call(c);
        }
        if round >= 5 {
            times.push(t0.elapsed().as_secs_f64() / copies.len() as f64);
        }
    }
    median(times)
}

fn report(label: &str, layout: &NmLayout, seconds: f64, bytes: usize) {
    let dense = (layout.rows * layout.cols) as f64;
    println!(
        "{label:<32} {:>8.1} us  {:>6.2} dense weights/ns  {:>6.1} GB/s",
        seconds * 1e6,
        dense / seconds / 1e9,
        bytes as f64 / seconds / 1e9
    );
}

/// One compressed weight: values, positions, and the int8 row scales (None for float values).
struct Compressed<E> {
    values: Vec<E>,
    index: Vec<u32>,
    scales: Option<Vec<f32>>,
}

impl<E: NmElem> Compressed<E> {
    fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.values[..])
            + 4 * self.index.len()
            + self.scales.as_ref().map_or(0, |s| 4 * s.len())
    }

    /// `y = x · Wᵀ` for float32 inputs, on the calling thread.
    fn call(&self, layout: &NmLayout, x: &[f32], y: &mut [f32]) {
        let scales = self.scales.as_deref();
        let (values, index) = (&self.values[..], &self.index[..]);
        run_blocks(
            layout,
            values,
            index,
            scales,
            None,
            x,
            1,
            y,
            0,
            layout.blocks(),
            level(),
        );
    }
}

/// The largest cache's size in bytes: `CAST_RS_LLC_MIB`, else the largest
/// `/sys/devices/system/cpu/cpu0/cache/index*/size`; exits when neither tells it (a rotation
/// smaller than the cache would time the cache, not memory).
fn llc_bytes() -> usize {
    if let Ok(mib) = std::env::var("CAST_RS_LLC_MIB") {
        match mib.parse::<f64>() {
            Ok(m) if m > 0.0 => return (m * (1u64 << 20) as f64) as usize,
            _ => panic!("CAST_RS_LLC_MIB: expected a size in MiB > 0, got {mib:?}"),
        }
    }
    let sizes = (0..8).filter_map(|i| {
        let path = format!("/sys/devices/system/cpu/cpu0/cache/index{i}/size");
        let text = std::fs::read_to_string(path).ok()?;
        let text = text.trim();
        let (num, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
        let scale = match unit {
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            _ => 1,
        };
        Some(num.parse::<usize>().ok()? * scale)
    });
    match sizes.max() {
        Some(bytes) => bytes,
        None => {
            eprintln!("the cache size is unknown here: set CAST_RS_LLC_MIB");
            std::process::exit(2)
        }
    }
}

/// `make(seed)` for seeds 0, 1, ...: one weight, or (`rotate`) enough copies to cover
/// twice the last-level cache (at least 256 MiB).
fn copies<E: NmElem>(rotate: bool, make: impl Fn(u64) -> Compressed<E>) -> Vec<Compressed<E>> {
    let first = make(0);
    let n = if rotate {
        (2 * llc_bytes()).max(256 << 20) / first.bytes() + 1
    } else {
        1
    };
    std::iter::once(first)
        .chain((1..n as u64).map(make))
        .collect()
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    println!("kernel: {:?}", level());
    println!(
        "memory rows: copies covering {} MiB (twice the {} MiB last-level cache, at least 256)",
        (2 * llc_bytes()).max(256 << 20) >> 20,
        llc_bytes() >> 20
    );
    for (rows, cols, rotate) in [(256usize, 2048usize, false), (4096, 4096, true)] {
        let layout = NmLayout::new(rows, cols, 2, 4).unwrap();
        let place = if rotate { "memory" } else { "L2" };
        let x: Vec<f32> = (0..cols).map(|i| (i % 7) as f32 * 0.1 - 0.3).collect();
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
        let mut y = vec![0f32; rows];
        let float = |w: &[f32]| -> Compressed<f32> {
            let (values, index) = compress(&layout, w).unwrap();
            Compressed {
                values,
                index,
                scales: None,
            }
        };
        let bf16 = |w: &[f32]| -> Compressed<Bf16> {
            let w: Vec<Bf16> = w.iter().map(|&v| Bf16::from_f32(v)).collect();
            let (values, index) = compress(&layout, &w).unwrap();
            Compressed {
                values,
                index,
                scales: None,
            }
        };
        let int8 = |w: &[f32]| -> Compressed<i8> {
            let (values, index, scales) = compress_int8(&layout, w).unwrap();
            Compressed {
                values,
                index,
                scales: Some(scales),
            }
        };

        let c = copies(rotate, |s| float(&weight(rows, cols, s)));
        let t = timed(&c, |w| w.call(&layout, &x, &mut y));
        report(
            &format!("f32 ({rows}, {cols}) {place}"),
            &layout,
            t,
            c[0].bytes(),
        );
        drop(c);

        let c = copies(rotate, |s| bf16(&weight(rows, cols, s)));
        let t = timed(&c, |w| w.call(&layout, &x, &mut y));
        report(
            &format!("bf16 x f32 ({rows}, {cols}) {place}"),
            &layout,
            t,
            c[0].bytes(),
        );
        let t = timed(&c, |w| {
            nm_linear_bf16_parallel(&layout, &w.values, &w.index, None, &xb, 1, &mut y).unwrap()
        });
        report(
            &format!("bf16 x bf16 ({rows}, {cols}) {place}"),
            &layout,
            t,
            c[0].bytes(),
        );
        drop(c);

        let c = copies(rotate, |s| int8(&weight(rows, cols, s)));
        let t = timed(&c, |w| w.call(&layout, &x, &mut y));
        report(
            &format!("int8 x f32 ({rows}, {cols}) {place}"),
            &layout,
            t,
            c[0].bytes(),
        );
        std::hint::black_box(&y);
    }
}
