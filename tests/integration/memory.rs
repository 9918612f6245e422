//! Memory stays flat as the input grows: the streaming engine holds a few windows, never the dataset.

use crate::common::*;

/// Peak resident memory (MiB) that armorm's summary line reports (the kernel's VmHWM) for `rows`
/// short conversations read from a file and written to stdout, each carrying a 4 KiB column: a run that
/// held its rows would hold 4 KiB more per row.
fn peak_mib(rows: usize) -> u64 {
    let note = "x".repeat(4096);
    let mut data = String::new();
    for i in 0..rows {
        data.push_str(&format!(
            "{{\"id\": {i}, \"note\": \"{note}\", \"prompt\": \"Question number {i}?\", \"response\": \"Answer {i}.\"}}\n"
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("rows.jsonl");
    std::fs::write(&input, data).unwrap();
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
        "--window-rows",
        "256",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), rows);
    let summary = err
        .lines()
        .find(|l| l.starts_with("armorm: scored"))
        .unwrap_or_else(|| panic!("no summary line: {err}"));
    let after = summary
        .split("peak memory ")
        .nth(1)
        .unwrap_or_else(|| panic!("no peak memory in: {summary}"));
    after.split(' ').next().unwrap().parse().unwrap()
}

/// Ten times the rows (8 MiB against 80 MiB of input) may not take much more memory: holding the
/// large run's rows would add over 100 MiB.
#[test]
fn peak_memory_does_not_grow_with_the_input() {
    let small = peak_mib(2_000);
    let large = peak_mib(20_000);
    assert!(
        large <= small + 40,
        "peak memory grew with the input: {small} MiB for 2,000 rows, {large} MiB for 20,000"
    );
}
