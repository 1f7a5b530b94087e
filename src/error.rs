//! The one error type of the crate.
//!
//! The binding layer maps each variant to a Python exception:
//! [`CastError::Value`] and [`CastError::Aliased`] → `ValueError`, [`CastError::Type`] →
//! `TypeError`, everything else → `cast_rs.CastError`; the C ABI (`capi`, for the `csrc/`
//! operators) maps them to the same classes through `c10::ValueError` / `c10::TypeError`.
//! Messages name the offending argument and say what was expected, because they are read by
//! someone whose training loop just stopped.
//!
//! The offending argument is data ([`Arg`]: a name and, for per-tensor list arguments, an
//! index), not only text: the Python layer reads it from the exception (`param`, `index`,
//! `detail`, `other_param`, `other_index`) to say which model parameter was meant, instead of
//! pattern-matching the message.

use std::borrow::Cow;
use std::fmt;

use thiserror::Error;

/// An argument of a kernel call: `lr`, or entry `index` of a list argument (`grads[3]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub name: Cow<'static, str>,
    pub index: Option<usize>,
}

impl Arg {
    /// Entry `index` of the list argument `name`.
    pub fn at(name: impl Into<Cow<'static, str>>, index: usize) -> Self {
        Arg {
            name: name.into(),
            index: Some(index),
        }
    }
}

impl From<&'static str> for Arg {
    fn from(name: &'static str) -> Self {
        Arg {
            name: Cow::Borrowed(name),
            index: None,
        }
    }
}

impl From<String> for Arg {
    fn from(name: String) -> Self {
        Arg {
            name: Cow::Owned(name),
            index: None,
        }
    }
}

impl From<&Arg> for Arg {
    fn from(a: &Arg) -> Self {
        a.clone()
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}[{i}]", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CastError {
    /// A value or shape is not acceptable (maps to `ValueError`).
    #[error("{param}: {msg}")]
    Value { param: Arg, msg: String },
    /// Two buffers that are written or read as distinct share memory (maps to `ValueError`).
    #[error("{param}: shares memory with {other}; each buffer must be its own tensor")]
    Aliased { param: Arg, other: Arg },
    /// A type or dtype is not acceptable (maps to `TypeError`).
    #[error("{param}: {msg}")]
    Type { param: Arg, msg: String },
    /// libtorch reported an error while running a generic-path op.
    #[error("libtorch error in {context}: {msg}")]
    Torch { context: String, msg: String },
    /// A Rust panic was caught before it could cross the FFI boundary.
    #[error("internal error (this is a cast-rs bug, please report it): {0}")]
    Internal(String),
}

impl CastError {
    pub fn value(param: impl Into<Arg>, msg: impl Into<String>) -> Self {
        CastError::Value {
            param: param.into(),
            msg: msg.into(),
        }
    }
    pub fn type_(param: impl Into<Arg>, msg: impl Into<String>) -> Self {
        CastError::Type {
            param: param.into(),
            msg: msg.into(),
        }
    }
    pub fn aliased(param: impl Into<Arg>, other: impl Into<Arg>) -> Self {
        CastError::Aliased {
            param: param.into(),
            other: other.into(),
        }
    }

    /// The same error, blamed on `param` instead (a helper validated a value on behalf of
    /// the argument that carried it).
    pub fn for_param(self, param: impl Into<Arg>) -> Self {
        match self {
            CastError::Value { msg, .. } => CastError::Value {
                param: param.into(),
                msg,
            },
            CastError::Type { msg, .. } => CastError::Type {
                param: param.into(),
                msg,
            },
            other => other,
        }
    }

    /// The argument this error is about, if any.
    pub fn param(&self) -> Option<&Arg> {
        match self {
            CastError::Value { param, .. }
            | CastError::Type { param, .. }
            | CastError::Aliased { param, .. } => Some(param),
            _ => None,
        }
    }

    /// The message without the leading `param: `, the part that stays when the caller
    /// names the argument its own way. For [`CastError::Aliased`] it contains the other
    /// buffer's label as the placeholder `{other}`.
    pub fn detail(&self) -> String {
        match self {
            CastError::Value { msg, .. } | CastError::Type { msg, .. } => msg.clone(),
            CastError::Aliased { .. } => {
                "shares memory with {other}; each buffer must be its own tensor".to_string()
            }
            other => other.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, CastError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_argument_and_entry() {
        assert_eq!(
            CastError::value("lr", "expected >= 0").to_string(),
            "lr: expected >= 0"
        );
        let e = CastError::type_(Arg::at("grads", 3), "expected dtype torch.float32");
        assert_eq!(e.to_string(), "grads[3]: expected dtype torch.float32");
        assert_eq!(e.param(), Some(&Arg::at("grads", 3)));
        let a = CastError::aliased(Arg::at("exp_avgs", 1), Arg::at("params", 0));
        assert_eq!(
            a.to_string(),
            "exp_avgs[1]: shares memory with params[0]; each buffer must be its own tensor"
        );
        assert_eq!(
            a.detail().replace("{other}", "params[0]"),
            a.to_string().split_once(": ").unwrap().1
        );
    }

    #[test]
    fn for_param_reblames_value_and_type_errors_only() {
        let e = CastError::value("dim", "out of range").for_param(Arg::at("params", 2));
        assert_eq!(e.to_string(), "params[2]: out of range");
        let t = CastError::Torch {
            context: "x".into(),
            msg: "y".into(),
        };
        assert_eq!(t.clone().for_param("z"), t);
    }
}
