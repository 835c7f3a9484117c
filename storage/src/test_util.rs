//! Helpers shared by this crate's unit tests.

use std::time::Duration;

/// How many times [`retry_sled_lock`] retries, and how long it waits between tries.
const SLED_LOCK_ATTEMPTS_MAX: u32 = 200;
const SLED_LOCK_RETRY_MS: u64 = 10;

/// Runs `open` (which opens a sled database) until it does not fail on sled's file lock.
///
/// Tests reopen sled in the same process right after dropping it, and sled 0.34 releases its
/// file lock from a background thread a moment after the drop, so a reopen can fail with
/// "could not acquire lock"; that is retried briefly (up to 2 s). A new process never sees
/// this. Any other outcome is returned as it is.
pub(crate) fn retry_sled_lock<T, E: std::fmt::Display>(
    mut open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut attempts = 0;
    loop {
        match open() {
            Err(e)
                if attempts < SLED_LOCK_ATTEMPTS_MAX
                    && e.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(SLED_LOCK_RETRY_MS));
            }
            other => return other,
        }
    }
}
