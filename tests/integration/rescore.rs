//! `armorm rescore` (issue 14): new scores from stored rewards and coefficients, checked by hand on a
//! file of known numbers, and against `armorm score`'s own scores with every weight 1.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use polars::prelude::*;
use serde_json::{json, Value};

use crate::common::*;

use armorm::ATTRIBUTES as ATTRS;

fn ok(out: &std::process::Output) -> &[u8] {
    assert!(
        out.status.success(),
        "armorm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Two scored-looking rows with rewards 1, 2, …, 19 (objective i has reward i + 1):
/// `even` has every coefficient 0.25 (score 0.25 · 190 = 47.5); `one` has coefficient 1 on
/// helpsteer-correctness alone (score 2).
fn known(path: &Path) {
    let rewards: Vec<f64> = (1..=19).map(f64::from).collect();
    let mut one = vec![0.0; 19];
    one[1] = 1.0;
    let mut f = File::create(path).unwrap();
    for (id, coefficients, score) in [("even", vec![0.25; 19], 47.5), ("one", one, 2.0)] {
        let row = json!({"id": id, "score": score, "rewards": rewards, "gating": vec![0.0; 19],
                         "coefficients": coefficients, "num_tokens": 7});
        writeln!(f, "{row}").unwrap();
    }
}

/// `armorm rescore INPUT ARGS... -o -`: the rows, by id.
fn rescore(input: &Path, args: &[&str]) -> HashMap<String, Value> {
    let mut all = vec!["rescore", input.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend(["-o", "-"]);
    json_lines(ok(&armorm(&all)))
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect()
}

fn score_of(rows: &HashMap<String, Value>, id: &str) -> f64 {
    rows[id]["score"].as_f64().unwrap()
}

#[test]
fn weights_fixed_coefficients_and_subsets_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);

    // Correctness (reward 2) doubled, verbosity (reward 5) negated:
    // even: 47.5 + 0.25·2 − 2·0.25·5 = 45.5; one: 2·2 = 4.
    let rows = rescore(
        &input,
        &[
            "--weights",
            "helpsteer-correctness=2,helpsteer-verbosity=-1",
        ],
    );
    assert!((score_of(&rows, "even") - 45.5).abs() < 1e-5);
    assert!((score_of(&rows, "one") - 4.0).abs() < 1e-5);
    assert_eq!(rows["even"]["score_original"].as_f64(), Some(47.5));
    let c = floats(&rows["even"]["coefficients"]);
    assert_eq!((c[0], c[1], c[4]), (0.25, 0.5, -0.25));
    assert_eq!(
        floats(&rows["even"]["coefficients_original"]),
        vec![0.25; 19]
    );

    // Fixed: correctness 1 (reward 2) and is_safe 0.5 (reward 11), the rest 0: 2 + 5.5 for both rows.
    let rows = rescore(
        &input,
        &[
            "--coefficients",
            "fixed:helpsteer-correctness=1,beavertails-is_safe=0.5",
        ],
    );
    for id in ["even", "one"] {
        assert!((score_of(&rows, id) - 7.5).abs() < 1e-5, "{id}");
    }

    // A subset: helpfulness (reward 1) and readability (reward 19): even 0.25·20 = 5; one 0.
    let rows = rescore(
        &input,
        &["--objectives", "helpsteer-helpfulness,code-readability"],
    );
    assert!((score_of(&rows, "even") - 5.0).abs() < 1e-5);
    assert_eq!(score_of(&rows, "one"), 0.0);

    // All three compose: fixed 1 on helpfulness and correctness, correctness ×3, only correctness
    // kept: 3·2 = 6 for both rows; repeated --weights flags add up to one list.
    let rows = rescore(
        &input,
        &[
            "--coefficients",
            "fixed:helpsteer-helpfulness=1,helpsteer-correctness=1",
            "--weights",
            "helpsteer-correctness=3",
            "--weights",
            "helpsteer-verbosity=9",
            "--objectives",
            "helpsteer-correctness",
        ],
    );
    for id in ["even", "one"] {
        assert!((score_of(&rows, id) - 6.0).abs() < 1e-5, "{id}");
    }
}

#[test]
fn a_rescore_of_a_rescore_composes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    let first = dir.path().join("first.parquet");
    let second = dir.path().join("second.parquet");
    let w = ["--weights", "helpsteer-correctness=2"];
    for (from, to) in [(&input, &first), (&first, &second)] {
        ok(&armorm(&[
            "rescore",
            from.to_str().unwrap(),
            w[0],
            w[1],
            "-o",
            to.to_str().unwrap(),
        ]));
    }
    // Correctness × 4 over the two steps: even 47.5 + 3·0.25·2 = 49; one 4·2 = 8; the originals are
    // the first file's.
    let rows = rescore(&second, &["--weights", "helpsteer-verbosity=1"]);
    assert!((score_of(&rows, "even") - 49.0).abs() < 1e-5);
    assert!((score_of(&rows, "one") - 8.0).abs() < 1e-5);
    assert_eq!(rows["one"]["score_original"].as_f64(), Some(2.0));
    let steps: Vec<Value> = serde_json::from_str(&parquet_metadata(&second)[METADATA]).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[1]["weights"]["helpsteer-correctness"], json!(2.0));
    assert_eq!(steps[1]["base"], json!("stored coefficients"));
}

const METADATA: &str = "armorm.rescore";

fn column_f32(df: &DataFrame, name: &str) -> Vec<f32> {
    let c = df.column(name).unwrap().f32().unwrap().clone();
    (0..c.len()).map(|i| c.get(i).unwrap()).collect()
}

#[test]
fn all_weights_one_reproduce_the_model_scores() {
    let dir = tempfile::tempdir().unwrap();
    let scored = dir.path().join("scored.parquet");
    let model = model_dir(TINY);
    ok(&armorm(&[
        "score",
        fixtures().join("conversations.jsonl").to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
        "--top-k",
        "3",
        "-q",
    ]));
    let ones = ATTRS
        .iter()
        .map(|a| format!("{a}=1"))
        .collect::<Vec<_>>()
        .join(",");
    let out = dir.path().join("rescored.parquet");
    ok(&armorm(&[
        "rescore",
        scored.to_str().unwrap(),
        "--weights",
        &ones,
        "-o",
        out.to_str().unwrap(),
    ]));
    let (before, after) = (read_parquet(&scored), read_parquet(&out));
    assert_eq!(after.height(), before.height());
    let (old, new) = (column_f32(&before, "score"), column_f32(&after, "score"));
    assert_eq!(column_f32(&after, "score_original"), old);
    let worst = max_abs_diff(&new, &old);
    assert!(worst <= 1e-6, "rescored score differs by {worst}");
    for name in [
        "coefficients",
        "rewards",
        "gating",
        "top_attributes",
        "top_coefficients",
    ] {
        assert!(
            after
                .column(name)
                .unwrap()
                .equals(before.column(name).unwrap()),
            "{name} changed"
        );
    }
    let (m_before, m_after) = (parquet_metadata(&scored), parquet_metadata(&out));
    for key in [
        "armorm.attributes",
        "armorm.model",
        "armorm.revision",
        "armorm.version",
        "armorm.dtype",
    ] {
        assert_eq!(m_after.get(key), m_before.get(key), "{key}");
    }
    let steps: Vec<Value> = serde_json::from_str(&m_after[METADATA]).unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["weights"][ATTRS[18]], json!(1.0));
}

#[test]
fn top_attributes_follow_the_new_coefficients() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    // With is_safe ×10 and correctness ×4, even's largest are is_safe (2.5), correctness (1), then
    // helpfulness (the first of the 0.25s).
    let text = std::fs::read_to_string(&input).unwrap();
    let with_top: String = text
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v["top_attributes"] = json!(["x", "y", "z"]);
            v["top_coefficients"] = json!([0.0, 0.0, 0.0]);
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&input, with_top).unwrap();
    let rows = rescore(
        &input,
        &[
            "--weights",
            "beavertails-is_safe=10,helpsteer-correctness=4",
        ],
    );
    let names: Vec<&str> = rows["even"]["top_attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "beavertails-is_safe",
            "helpsteer-correctness",
            "helpsteer-helpfulness"
        ]
    );
    assert_eq!(floats(&rows["even"]["top_coefficients"]), [2.5, 1.0, 0.25]);
    // one: correctness 4, then two zeros in model order.
    assert_eq!(floats(&rows["one"]["top_coefficients"]), [4.0, 0.0, 0.0]);
}

#[test]
fn several_inputs_are_read_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    known(&a);
    let b = dir.path().join("b.jsonl");
    let text = std::fs::read_to_string(&a)
        .unwrap()
        .replace("\"even\"", "\"even2\"")
        .replace("\"one\"", "\"one2\"");
    std::fs::write(&b, text).unwrap();
    let out = armorm(&[
        "rescore",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--objectives",
        "helpsteer-correctness",
        "-o",
        "-",
    ]);
    let ids: Vec<String> = json_lines(ok(&out))
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["even", "one", "even2", "one2"]);
}

#[test]
fn bad_rules_and_bad_files_are_refused_with_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    let out_path = dir.path().join("out.parquet");
    let run = |args: &[&str]| {
        let mut all = vec!["rescore"];
        all.extend_from_slice(args);
        all.extend(["-o", out_path.to_str().unwrap()]);
        let out = armorm(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(!out_path.exists(), "{args:?} left an output");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let i = input.to_str().unwrap();

    let e = run(&[i, "--weights", "helpsteer-correctnes=2"]);
    assert!(
        e.contains("`helpsteer-correctnes`")
            && e.contains("helpsteer-correctness, helpsteer-coherence"),
        "{e}"
    );
    let e = run(&[
        i,
        "--objectives",
        "helpsteer-correctness,helpsteer-correctness",
    ]);
    assert!(e.contains("named twice"), "{e}");
    let e = run(&[i]);
    assert!(e.contains("nothing to do"), "{e}");

    // Row 2's rewards have 18 values.
    let bad = dir.path().join("bad.jsonl");
    let text = std::fs::read_to_string(&input).unwrap();
    let mut lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines[1]["rewards"].as_array_mut().unwrap().pop();
    std::fs::write(
        &bad,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let e = run(&[
        i,
        bad.to_str().unwrap(),
        "--weights",
        "helpsteer-correctness=2",
    ]);
    assert!(
        e.contains("bad.jsonl") && e.contains("row 2: `rewards` has 18 values"),
        "{e}"
    );

    // Not a scored file.
    let e = run(&[
        fixtures().join("conversations.jsonl").to_str().unwrap(),
        "--weights",
        "helpsteer-correctness=2",
    ]);
    assert!(
        e.contains("conversations.jsonl") && e.contains("no `rewards` column"),
        "{e}"
    );

    // A bad number is refused by the argument parser (exit 2).
    let out = armorm(&["rescore", i, "--weights", "helpsteer-correctness=two"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a finite number"));
}

#[test]
fn parquet_inputs_keep_the_metadata_they_agree_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let input = fixtures().join("conversations.jsonl");
    // The same model under another name (armorm.model differs), and a model of 7 objectives.
    let other = d("other-name");
    std::os::unix::fs::symlink(model_dir(TINY), &other).unwrap();
    for (m, out) in [
        (model_dir(TINY), "a.parquet"),
        (other, "b.parquet"),
        (model_dir(ALT), "c.parquet"),
    ] {
        ok(&armorm(&[
            "score",
            input.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "-o",
            d(out).to_str().unwrap(),
            "-q",
        ]));
    }
    let (a, b, out) = (d("a.parquet"), d("b.parquet"), d("out.parquet"));
    let run = armorm(&[
        "rescore",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--weights",
        "helpsteer-correctness=2",
        "-o",
        out.to_str().unwrap(),
    ]);
    ok(&run);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("b.parquet") && err.contains("armorm.model"),
        "{err}"
    );
    let meta = parquet_metadata(&out);
    assert!(!meta.contains_key("armorm.model"), "the two names differ");
    assert_eq!(meta["armorm.version"], env!("CARGO_PKG_VERSION"));
    assert!(meta.contains_key(METADATA));
    assert_eq!(read_parquet(&out).height(), 2 * read_parquet(&a).height());

    // Other objectives are refused.
    let c = d("c.parquet");
    let refused = armorm(&[
        "rescore",
        a.to_str().unwrap(),
        c.to_str().unwrap(),
        "--weights",
        "helpsteer-correctness=2",
        "-o",
        d("out3.parquet").to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("c.parquet: its objectives differ"), "{err}");

    // A rescored file and a plain one: different histories (and columns) are refused.
    let out2 = d("out2.parquet");
    let refused = armorm(&[
        "rescore",
        out.to_str().unwrap(),
        a.to_str().unwrap(),
        "--weights",
        "helpsteer-correctness=2",
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("a.parquet") && err.contains("armorm.rescore"),
        "{err}"
    );
    assert!(!out2.exists());
}
