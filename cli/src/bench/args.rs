//! Argument checks the benchmark scenarios share.

use std::time::Duration;

use crate::error::CliError;

/// `value` seconds, given as `flag`, as a positive duration.
pub(super) fn secs(flag: &str, value: f64) -> Result<Duration, CliError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| CliError::Usage(format!("{flag} must be a positive number of seconds")))
}
