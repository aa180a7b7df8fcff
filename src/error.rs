//! The crate's one error type. Every variant says which op and which tensor or key it is
//! about, and what was expected, so a user can act on the message alone; [`Error::kind`]
//! says what kind of failure it is, for callers that branch on it (retry after freeing
//! memory, fall back to another implementation on an unsupported shape, ...).

use std::fmt;

use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

/// What kind of failure an [`Error`] is, for callers that match on it. More kinds may be
/// added; match with a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An argument is wrong for the op: a shape, length or stride that does not match, a
    /// value outside its domain, an index out of range, a buffer on another device.
    InvalidArgument,
    /// The arguments are consistent but outside what the kernels implement (a rotary dim
    /// past the kernel's limit, more experts than the kernels handle, more shared memory
    /// than the device has).
    Unsupported,
    /// A device pointer is not aligned to the element type the op reads through it.
    Alignment,
    /// A size overflows `usize`, or a count does not fit the kernels' 32-bit indexing or
    /// the launch's grid limit.
    Overflow,
    /// A model configuration (config.json or a builder) is missing a key, has one of the
    /// wrong type, or a value outside its domain ([`Error::Config`]).
    Config,
    /// No usable CUDA device ([`Error::NoDevice`]).
    NoDevice,
    /// The crate was built without nvcc ([`Error::KernelsNotCompiled`]).
    KernelsNotCompiled,
    /// The CUDA driver reported `CUDA_ERROR_OUT_OF_MEMORY` (an allocation or a launch).
    OutOfMemory,
    /// Any other failure of a CUDA driver call ([`Error::Cuda`]).
    Driver,
    /// The CPU emulator stopped a kernel ([`Error::Emulator`]).
    Emulator,
}

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
        /// The driver's error, when the failure came from a driver call (also given by
        /// [`std::error::Error::source`]); `None` for failures around one (a poisoned
        /// cache lock).
        source: Option<DriverError>,
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
        /// Which kind of argument failure: [`ErrorKind::InvalidArgument`],
        /// [`ErrorKind::Unsupported`], [`ErrorKind::Alignment`] or [`ErrorKind::Overflow`].
        kind: ErrorKind,
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
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoDevice { .. } => ErrorKind::NoDevice,
            Error::KernelsNotCompiled => ErrorKind::KernelsNotCompiled,
            Error::Cuda {
                source: Some(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)),
                ..
            } => ErrorKind::OutOfMemory,
            Error::Cuda { .. } => ErrorKind::Driver,
            Error::Config { .. } => ErrorKind::Config,
            Error::InvalidArgument { kind, .. } => *kind,
            Error::Emulator { .. } => ErrorKind::Emulator,
        }
    }

    fn argument(
        op: &'static str,
        arg: &'static str,
        problem: impl Into<String>,
        kind: ErrorKind,
    ) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            problem: problem.into(),
            kind,
        }
    }

    /// An argument that does not match the op (kind [`ErrorKind::InvalidArgument`]).
    pub(crate) fn invalid(op: &'static str, arg: &'static str, problem: impl Into<String>) -> Self {
        Self::argument(op, arg, problem, ErrorKind::InvalidArgument)
    }

    /// A size that overflows, or does not fit the kernels' indexing (kind
    /// [`ErrorKind::Overflow`]).
    pub(crate) fn overflow(
        op: &'static str,
        arg: &'static str,
        problem: impl Into<String>,
    ) -> Self {
        Self::argument(op, arg, problem, ErrorKind::Overflow)
    }

    /// Consistent arguments outside what the kernels implement (kind
    /// [`ErrorKind::Unsupported`]).
    pub(crate) fn unsupported(
        op: &'static str,
        arg: &'static str,
        problem: impl Into<String>,
    ) -> Self {
        Self::argument(op, arg, problem, ErrorKind::Unsupported)
    }

    /// A misaligned device pointer (kind [`ErrorKind::Alignment`]).
    pub(crate) fn misaligned(
        op: &'static str,
        arg: &'static str,
        problem: impl Into<String>,
    ) -> Self {
        Self::argument(op, arg, problem, ErrorKind::Alignment)
    }

    pub(crate) fn config(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// A failed driver call made by `op`, keeping the driver's error as the source.
    pub(crate) fn driver(op: &'static str, e: DriverError) -> Self {
        Error::Cuda {
            op,
            message: e.to_string(),
            source: Some(e),
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
            Error::Cuda { op, message, .. } => write!(f, "{op}: CUDA error: {message}"),
            Error::Config { key, problem } => write!(f, "config key `{key}`: {problem}"),
            Error::Emulator { op, message } => write!(f, "{op}: emulator: {message}"),
            Error::InvalidArgument {
                op, arg, problem, ..
            } => {
                write!(f, "{op}: argument `{arg}`: {problem}")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Cuda {
                source: Some(e), ..
            } => Some(e),
            _ => None,
        }
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
