//! The crate's one error type. Every variant says which op and which tensor or key it is
//! about, and what was expected, so a user can act on the message alone.

use std::fmt;

/// Everything that can go wrong in `longctx`. Library code never panics on user input; it
/// returns one of these instead.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// No usable CUDA device: the driver library is missing, no GPU is visible, or the
    /// ordinal is out of range.
    NoDevice {
        /// What was looked for and what was found.
        reason: String,
    },
    /// The crate was built without nvcc, so no kernel is embedded.
    KernelsNotCompiled,
    /// A CUDA driver call failed.
    Cuda {
        /// The op or step that made the call.
        op: &'static str,
        /// The driver's message.
        message: String,
    },
    /// A model configuration (config.json or a builder) is missing a key, has a key of the
    /// wrong type, or has a value outside its domain.
    Config {
        /// The key, as spelled in HF transformers' config.json (`rope_scaling.factor`, ...).
        key: String,
        /// What was wrong with it.
        problem: String,
    },
    /// An argument to an op failed validation; nothing was launched.
    InvalidArgument {
        /// The op (`rope`, `attention`, ...).
        op: &'static str,
        /// The tensor or argument (`q`, `positions`, `table`, ...).
        arg: &'static str,
        /// What was expected and what was found.
        problem: String,
    },
    /// The CPU emulator stopped a kernel: a race, an out-of-bounds or uninitialised access,
    /// lanes or threads that disagree at a collective or barrier, or a trap. The message
    /// names the kernel, block, thread and address.
    Emulator {
        /// The op that launched the kernel.
        op: &'static str,
        /// What the emulator found.
        message: String,
    },
}

impl Error {
    pub(crate) fn invalid(op: &'static str, arg: &'static str, problem: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            problem: problem.into(),
        }
    }

    pub(crate) fn config(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDevice { reason } => write!(f, "no CUDA device: {reason}"),
            Error::KernelsNotCompiled => write!(
                f,
                "longctx was built without its CUDA kernels because nvcc was not found; install a \
                 CUDA compiler (scripts/install-cuda-toolchain.sh installs one from PyPI), point \
                 NVCC or CUDA_HOME at it, and rebuild"
            ),
            Error::Cuda { op, message } => write!(f, "{op}: CUDA error: {message}"),
            Error::Config { key, problem } => write!(f, "config key `{key}`: {problem}"),
            Error::Emulator { op, message } => write!(f, "{op}: emulator: {message}"),
            Error::InvalidArgument { op, arg, problem } => {
                write!(f, "{op}: argument `{arg}`: {problem}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
