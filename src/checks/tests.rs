//! Tests of the argument rules: a valid step call and its plan, each refusal with its
//! argument, index and message, aliasing within and across parameters, and the arguments of
//! the mask and scaling entry points.

use super::{
    first_shared_sweep, mask_args, scale_args, scale_grad_args, step_args, step_call_args,
    unpack_args, Dev, Dtype, Meta, StepConfig, StepMeta, StepPlan,
};
use crate::adams::AdamsHyper;
use crate::error::{Arg, CastError, Result};

/// A contiguous tensor of `size` at address `start`.
fn meta(dtype: Dtype, size: &[i64], start: usize) -> Meta {
    let mut stride = vec![1i64; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * size[d + 1].max(1);
    }
    let elt = match dtype {
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::F32 | Dtype::I32 => 4,
        Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
        _ => 1,
    };
    Meta {
        dtype,
        dev: Dev::Cpu,
        size: size.to_vec(),
        stride,
        start,
        nbytes: size.iter().product::<i64>() as usize * elt,
        contiguous: true,
        sparse: false,
    }
}

fn cfg() -> StepConfig {
    StepConfig {
        hyper: AdamsHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            l1_decay: 0.1,
            masked_lr_scale: 1.0,
        },
        total_steps: Some(100.0),
        mask_interval: 1,
        l1_decays: None,
        weight_decays: None,
        force_generic: false,
    }
}

/// A sparse 2:4 parameter of shape [4, 8] whose buffers start at `base`, 1 KiB apart.
fn sparse(base: usize) -> StepMeta {
    StepMeta {
        param: meta(Dtype::F32, &[4, 8], base),
        grad: meta(Dtype::F32, &[4, 8], base + 1024),
        exp_avg: meta(Dtype::F32, &[4, 8], base + 2048),
        exp_avg_sq: meta(Dtype::F32, &[4, 8], base + 3072),
        mask: Some(meta(Dtype::U8, &[4], base + 4096)),
        pattern: Some((2, 4, -1)),
        step: meta(Dtype::F32, &[], base + 5120),
        steps_done: Some(0.0),
    }
}

fn err(r: Result<Vec<StepPlan>>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn a_valid_call_plans_the_fast_path_and_step_one() {
    let plans = step_args(&cfg(), &[sparse(0), sparse(1 << 20)]).unwrap();
    assert_eq!(plans.len(), 2);
    assert!(plans
        .iter()
        .all(|p| p.fast == Some(Dtype::F32) && p.step == 1.0 && p.mask.is_some()));
    let mut c = cfg();
    c.force_generic = true;
    assert!(step_args(&c, &[sparse(0)])
        .unwrap()
        .iter()
        .all(|p| p.fast.is_none()));
}

#[test]
fn sixteen_bit_params_take_their_fast_path_and_others_the_generic_one() {
    for (d, want) in [
        (Dtype::BF16, Some(Dtype::BF16)),
        (Dtype::F16, Some(Dtype::F16)),
        (Dtype::F64, None),
    ] {
        let mut t = sparse(0);
        for m in [&mut t.param, &mut t.grad, &mut t.exp_avg, &mut t.exp_avg_sq] {
            *m = meta(d, &[4, 8], m.start);
        }
        assert_eq!(
            step_args(&cfg(), &[t.clone()]).unwrap()[0].fast,
            want,
            "{d:?}"
        );
        // A state buffer in another dtype is an error, not a silent generic step.
        t.exp_avg = meta(Dtype::F32, &[4, 8], t.exp_avg.start);
        assert!(err(step_args(&cfg(), &[t])).contains("exp_avgs"));
    }
}

#[test]
fn per_parameter_errors_carry_the_argument_and_index() {
    let mut t = sparse(0);
    t.grad.dtype = Dtype::F64;
    let e = step_args(&cfg(), &[sparse(1 << 20), t]).unwrap_err();
    assert_eq!(e.param(), Some(&Arg::at("grads", 1)));
    assert!(e
        .to_string()
        .contains("expected dtype torch.float32 (the parameter's), got torch.float64"));

    let mut t = sparse(0);
    t.exp_avg_sq.size = vec![4, 4];
    assert!(err(step_args(&cfg(), &[t])).starts_with("exp_avg_sqs[0]: expected shape [4, 8]"));

    let mut t = sparse(0);
    t.mask = None;
    assert_eq!(
        err(step_args(&cfg(), &[t])),
        "masks[0]: a sparse parameter needs a packed mask tensor"
    );

    let mut t = sparse(0);
    t.steps_done = None;
    assert!(err(step_args(&cfg(), &[t])).starts_with("steps[0]: expected a one-element"));
}

#[test]
fn the_pattern_is_checked_against_the_parameter() {
    let mut t = sparse(0);
    t.pattern = Some((2, 3, -1));
    assert!(err(step_args(&cfg(), &[t]))
        .starts_with("params[0]: 2:3 groups run along the last dimension"));
    let mut t = sparse(0);
    t.pattern = Some((2, 4, 1)); // dim 1 of a 2-d tensor is its last: fine
    assert!(step_args(&cfg(), &[t]).is_ok());
    let mut t = sparse(0);
    t.pattern = Some((4, 4, -1));
    assert!(err(step_args(&cfg(), &[t])).starts_with("pattern: N must satisfy"));
    let mut c = cfg();
    c.total_steps = None;
    assert!(err(step_args(&c, &[sparse(0)])).starts_with("total_steps: required for sparse"));
}

#[test]
fn aliasing_within_and_across_parameters_is_refused() {
    let mut t = sparse(0);
    t.exp_avg.start = t.param.start + 16; // overlaps params[0]
    let e = step_args(&cfg(), &[t]).unwrap_err();
    assert_eq!(
        e,
        CastError::aliased(Arg::at("exp_avgs", 0), Arg::at("params", 0))
    );

    // Parameter 1's gradient overlaps parameter 0's exp_avg: only the sweep sees it.
    let a = sparse(0);
    let mut b = sparse(1 << 20);
    b.grad.start = a.exp_avg.start + 64;
    let e = step_args(&cfg(), &[a.clone(), b.clone()]).unwrap_err();
    assert_eq!(
        e,
        CastError::aliased(Arg::at("grads", 1), Arg::at("exp_avgs", 0))
    );
    // The generic path works on whole tensors, not slices: not refused there.
    let mut c = cfg();
    c.force_generic = true;
    assert!(step_args(&c, &[a, b]).is_ok());
}

#[test]
fn self_overlapping_layouts_are_refused_for_written_buffers() {
    let mut t = sparse(0);
    t.exp_avg.stride = vec![0, 1]; // expand()ed rows
    assert!(err(step_args(&cfg(), &[t])).starts_with("exp_avgs[0]: elements overlap in memory"));
    // A read-only gradient may be expanded.
    let mut t = sparse(0);
    t.grad.stride = vec![0, 1];
    t.grad.contiguous = false;
    assert!(step_args(&cfg(), &[t]).is_ok());
    let transposed = Meta {
        stride: vec![1, 4],
        ..meta(Dtype::F32, &[4, 8], 0)
    };
    assert!(!transposed.self_overlapping());
}

#[test]
fn scalar_arguments_and_list_lengths() {
    let mut c = cfg();
    c.mask_interval = 0;
    assert!(err(step_args(&c, &[sparse(0)])).starts_with("mask_interval:"));
    let mut c = cfg();
    c.total_steps = Some(0.5);
    assert!(err(step_args(&c, &[sparse(0)])).starts_with("total_steps: expected a number >= 1"));
    let mut c = cfg();
    c.l1_decays = Some(vec![0.1, -1.0]);
    assert!(err(step_args(&c, &[sparse(0), sparse(1 << 20)])).starts_with("l1_decays[1]:"));
    assert_eq!(
        step_call_args(&cfg(), 2, &[("grads", 1)])
            .unwrap_err()
            .to_string(),
        "grads: expected 2 entries (one per parameter), got 1"
    );
    let mut c = cfg();
    c.hyper.beta1 = 1.0;
    assert!(err(step_args(&c, &[sparse(0)])).starts_with("betas[0]:"));
}

#[test]
fn sweep_finds_overlaps_regardless_of_order() {
    let r = |s: usize, e: usize, i: usize| ((s, e), Arg::at("params", i));
    assert!(first_shared_sweep(vec![r(0, 10, 0), r(20, 30, 1), r(10, 20, 2)]).is_ok());
    // A long range hiding a later short one.
    let e = first_shared_sweep(vec![r(0, 100, 0), r(10, 20, 1), r(50, 60, 2)]).unwrap_err();
    assert_eq!(
        e,
        CastError::aliased(Arg::at("params", 1), Arg::at("params", 0))
    );
    assert!(first_shared_sweep(vec![r(5, 5, 0), r(0, 10, 1)]).is_ok());
}

#[test]
fn mask_unpack_and_scale_arguments() {
    let x = meta(Dtype::I64, &[4, 8], 0);
    assert_eq!(
        mask_args(&x, 2, 4, -1).unwrap_err().to_string(),
        "x: expected a floating-point tensor, got dtype torch.int64"
    );
    let x = meta(Dtype::BF16, &[4, 8], 0);
    assert!(mask_args(&x, 2, 4, 0).is_ok());
    assert!(mask_args(&x, 2, 8, 0)
        .unwrap_err()
        .to_string()
        .starts_with("x: 2:8 groups run along the dimension 0"));
    assert!(mask_args(&x, 2, 4, 5)
        .unwrap_err()
        .to_string()
        .starts_with("x: groups run along"));

    assert!(unpack_args(&meta(Dtype::U8, &[4], 0), &[4, 8]).is_ok());
    assert!(unpack_args(&meta(Dtype::U8, &[5], 0), &[4, 8])
        .unwrap_err()
        .to_string()
        .starts_with("bits: expected a 1-d tensor of 4 bytes"));
    assert!(unpack_args(&meta(Dtype::Bool, &[4], 0), &[4, 8])
        .unwrap_err()
        .to_string()
        .starts_with("bits: expected a uint8"));

    let w = meta(Dtype::F32, &[6, 8], 0);
    let s = scale_args(&w, &meta(Dtype::F32, &[6, 2], 0), 2, -1).unwrap();
    assert_eq!((s.rows, s.cols, s.groups), (6, 8, 2));
    let s = scale_args(&w, &meta(Dtype::F32, &[8, 3], 0), 3, 0).unwrap();
    assert_eq!((s.rows, s.cols, s.groups), (8, 6, 3));
    assert!(scale_args(&w, &meta(Dtype::F64, &[6, 2], 0), 2, -1)
        .unwrap_err()
        .to_string()
        .starts_with("scale: expected floating tensors of one dtype"));
    assert!(scale_args(&w, &meta(Dtype::F32, &[6, 2], 0), 2, 2)
        .unwrap_err()
        .to_string()
        .starts_with("dim:"));
    assert!(scale_args(&w, &meta(Dtype::F32, &[6, 3], 0), 3, -1)
        .unwrap_err()
        .to_string()
        .starts_with("groups:"));
    assert!(scale_grad_args(&meta(Dtype::F32, &[8, 6], 0), &w)
        .unwrap_err()
        .to_string()
        .starts_with("grad:"));
}
