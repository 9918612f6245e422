//! Progress on stderr: a bar while a terminal watches, a one-line summary at the end.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use armorm::model::profile::Report;
use armorm::pipeline::{Observer, Stats};

/// Resolution of the bar when the input size is known: per mille of the input read.
const STEPS: u64 = 1000;

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Progress {
    /// A bar only when stderr is a terminal and not `--quiet`; an ETA only when every input's size is known.
    pub fn new(quiet: bool, sized: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = if sized {
                let bar = ProgressBar::with_draw_target(Some(STEPS), ProgressDrawTarget::stderr());
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {percent:>3}% ETA {eta} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            } else {
                ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
            };
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self { bar, quiet }
    }

    /// The summary line, ending with `setup`: how the rows ran (attention, token budget).
    pub fn finish(&self, stats: &Stats, setup: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{}, {setup}", summary(stats));
        }
    }
}

impl Observer for Progress {
    fn written(&self, stats: &Stats, input_fraction: Option<f64>) {
        if let Some(bar) = &self.bar {
            if let Some(f) = input_fraction {
                bar.set_position((f * STEPS as f64) as u64);
            }
            bar.set_message(format!(
                "{} rows, {:.0} tokens/s",
                stats.rows,
                stats.tokens_per_second()
            ));
        }
    }
}

pub fn summary(s: &Stats) -> String {
    let memory = peak_memory_mib().map_or(String::new(), |m| format!(", peak memory {m} MiB"));
    let skipped = if s.skipped > 0 {
        format!(", {} rows skipped", s.skipped)
    } else {
        String::new()
    };
    let shared = s.shared_tokens.map_or(String::new(), |saved| {
        let share = if s.tokens > 0 {
            100.0 * saved as f64 / s.tokens as f64
        } else {
            0.0
        };
        format!(", prefix sharing saved {saved} tokens ({share:.1}%)")
    });
    format!(
        "armorm: scored {} rows, {} tokens in {:.2} s: {:.0} tokens/s, padding overhead {:.1}%{shared}{memory}{skipped}",
        s.rows,
        s.tokens,
        s.seconds,
        s.tokens_per_second(),
        s.padding_overhead()
    )
}

/// The `ARMORM_PROFILE` breakdown: one line per section, largest first, each with its share of the
/// batches' time; lines start with `armorm: profile:` so that scripts can pick them out.
pub fn profile(report: &Report) -> String {
    let total = report.total.as_secs_f64();
    let share = |secs: f64| {
        if total > 0.0 {
            100.0 * secs / total
        } else {
            0.0
        }
    };
    let mut sections = report.sections.clone();
    sections.sort_by_key(|s| std::cmp::Reverse(s.time));
    let mut out = format!(
        "armorm: profile: {} batches, {total:.3} s in the model, summed over lanes and devices (the \
         device is synchronized around each section, so this run is slower than an unprofiled one)\n",
        report.batches
    );
    for s in sections.iter().filter(|s| s.calls > 0) {
        let secs = s.time.as_secs_f64();
        out += &format!(
            "armorm: profile: {:<13} {secs:>10.3} s {:>6.1}% {:>9} calls\n",
            s.section.name(),
            share(secs),
            s.calls
        );
    }
    let rest = report.unattributed().as_secs_f64();
    out += &format!(
        "armorm: profile: {:<13} {rest:>10.3} s {:>6.1}%\n",
        "unattributed",
        share(rest)
    );
    out
}

/// This process's peak resident memory (Linux's VmHWM, which unlike getrusage's maxrss does not carry
/// over the parent's memory from before exec).
fn peak_memory_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
