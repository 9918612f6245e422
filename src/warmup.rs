//! Kernel warm-up on CUDA: candle's kernels ship as PTX, which the driver compiles for the card when a
//! module is first used (about 11 s of ptxas on the build machine for the modules a forward pass uses,
//! ~20 s measured on an H200 node). Loading the modules on a thread of their own while the weights are
//! read moves that compile off the first batch's path, onto time the load spends anyway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::Device;

/// A background thread loading candle's kernel modules for one device. Dropping it stops the thread
/// after the module it is loading and waits for it, so that the process never exits while the driver
/// is compiling (a driver torn down under a running compile can crash at exit).
pub struct Warmup {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Warmup {
    /// Starts the warm-up for `device` (CUDA only; nothing elsewhere, or with
    /// `ARMORM_KERNEL_WARMUP=0`). Best effort: a module that fails here is loaded again, with its
    /// error reported, by the first operation that needs it.
    pub fn start(device: &Device) -> Self {
        let off = std::env::var_os("ARMORM_KERNEL_WARMUP").is_some_and(|v| v == "0");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = if off {
            None
        } else {
            spawn(device, stop.clone())
        };
        Self { stop, thread }
    }

    /// Whether a warm-up thread was started.
    pub fn started(&self) -> bool {
        self.thread.is_some()
    }
}

impl Drop for Warmup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(feature = "cuda")]
fn spawn(device: &Device, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    use candle_kernels as k;
    let Device::Cuda(dev) = device else {
        return None;
    };
    // In the order a forward pass first needs them (embedding, casts, norms and RoPE, adds, SiLU,
    // scaling, zeros, masks); candle loads one module at a time, so the order decides what is ready
    // first. Any function of a module loads the whole module.
    const MODULES: [(&str, k::Module); 8] = [
        ("is_u32_bf16", k::INDEXING),
        ("cast_bf16_f32", k::CAST),
        ("rmsnorm_bf16", k::REDUCE),
        ("badd_bf16", k::BINARY),
        ("usilu_bf16", k::UNARY),
        ("affine_bf16", k::AFFINE),
        ("fill_bf16", k::FILL),
        ("where_u8_bf16", k::TERNARY),
    ];
    let dev = dev.clone();
    let warm = move || {
        for (function, module) in &MODULES {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            // Errors are left to the operation that needs the module (see `start`).
            let _ = dev.get_or_load_func(function, module);
        }
    };
    // A failed spawn only means no warm-up.
    std::thread::Builder::new()
        .name("armorm-kernel-warmup".into())
        .spawn(warm)
        .ok()
}

#[cfg(not(feature = "cuda"))]
fn spawn(_device: &Device, _stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_to_warm_on_the_cpu() {
        let warmup = Warmup::start(&Device::Cpu);
        assert!(!warmup.started());
    }
}
