//! The one error type of the crate.
//!
//! The binding layer maps each variant to a Python exception:
//! [`CastError::Value`] → `ValueError`, [`CastError::Type`] → `TypeError`,
//! everything else → `cast_rs.CastError`. Messages name the offending parameter and say
//! what was expected, because they are read by someone whose training loop just stopped.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CastError {
    /// A value or shape is not acceptable (maps to `ValueError`).
    #[error("{param}: {msg}")]
    Value { param: String, msg: String },
    /// A type or dtype is not acceptable (maps to `TypeError`).
    #[error("{param}: {msg}")]
    Type { param: String, msg: String },
    /// libtorch reported an error while running a generic-path op.
    #[error("libtorch error in {context}: {msg}")]
    Torch { context: String, msg: String },
    /// A Rust panic was caught before it could cross the FFI boundary.
    #[error("internal error (this is a cast-rs bug, please report it): {0}")]
    Internal(String),
}

impl CastError {
    pub fn value(param: impl Into<String>, msg: impl Into<String>) -> Self {
        CastError::Value {
            param: param.into(),
            msg: msg.into(),
        }
    }
    pub fn type_(param: impl Into<String>, msg: impl Into<String>) -> Self {
        CastError::Type {
            param: param.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, CastError>;
