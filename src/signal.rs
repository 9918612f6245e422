//! SIGINT and SIGTERM during a scoring run: the first asks the run to stop at the next window boundary
//! (committed windows stay for `--resume`, temporary files are removed); a second ends the process at
//! once, as the default action would.

use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that asked the run to stop, 0 while none has.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The run stopped because of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", name(*.0))]
pub struct Interrupted(pub i32);

impl Interrupted {
    /// 128 + the signal number, as a shell reports a process the signal ended (130, 143).
    pub fn exit_code(&self) -> u8 {
        (128 + self.0).clamp(0, 255) as u8
    }
}

fn name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

/// The first stopping signal received since the process started, if any.
pub fn received() -> Option<Interrupted> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        n => Some(Interrupted(n)),
    }
}

/// Fails with `Interrupted` once a stopping signal has arrived.
pub fn check() -> Result<(), Interrupted> {
    received().map_or(Ok(()), Err)
}

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: an atomic swap, and `_exit` for a second signal.
    if RECEIVED.swap(signal, Ordering::SeqCst) != 0 {
        // SAFETY: `_exit` is async-signal-safe and never returns.
        unsafe { libc::_exit(128 + signal) };
    }
}

/// While alive, SIGINT and SIGTERM are caught (see the module text); dropping it restores their
/// default action, so that the commands' work after scoring can be interrupted as usual.
pub struct Catch {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl Catch {
    pub fn install() -> Self {
        let mut previous = Vec::new();
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
            // touches an atomic (see `on_signal`).
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut action.sa_mask);
                // Reads and writes in progress go on rather than fail with EINTR.
                action.sa_flags = libc::SA_RESTART;
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(signal, &action, &mut old) == 0 {
                    previous.push((signal, old));
                }
            }
        }
        Self { previous }
    }
}

impl Drop for Catch {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restores the action that `install` replaced.
            unsafe {
                libc::sigaction(*signal, old, std::ptr::null_mut());
            }
        }
    }
}
