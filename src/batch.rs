//! Length-bucketed batching: rows sorted by length, cut into batches whose size fits a token budget, at
//! the cuts that cost the least: padded size (rows × longest row) where attention pads the rows, their
//! own tokens where it runs on the flat rows.
//!
//! The rest of the batching policy lives elsewhere: the window (the rows batched together) is
//! `--window-rows` (`cli/score.rs`), read in windows by `pipeline`; the budget is `--max-batch-tokens`
//! (`cli/mod.rs`), shared among lanes (`Scorer::with_lanes`) and lowered when a batch runs out of
//! memory and is split in two (`Scorer::score_rows`), both in `scorer.rs`.

/// What one extra forward pass costs, in tokens: the fixed work of a pass (kernel launches,
/// per-batch tensors) that makes many tiny batches worse than a little padding.
pub const BATCH_OVERHEAD_TOKENS: usize = 64;

/// The most rows in one batch: flash attention launches a grid with one block row per batch row, and a
/// CUDA grid's y and z dimensions stop at 65,535 (a larger launch fails, and its kernels report no
/// errors). Reached only with a budget far above `auto`'s, on tiny rows.
pub const MAX_BATCH_ROWS: usize = 65_535;

/// How a batch's tokens are counted, against the budget and as its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Rows × longest row: attention on padded rows (blocked attention), where padding is computed
    /// and held like any token.
    Padded,
    /// The rows' own tokens: variable-length attention over the flat rows pads nothing, so only the
    /// budget and the per-pass overhead decide the cuts (the fewest batches that fit).
    Flat,
}

/// Groups of row indices, shortest rows first. Rows sorted by length are cut into consecutive runs,
/// chosen by dynamic programming to minimize the batches' tokens as `cost` counts them plus
/// `BATCH_OVERHEAD_TOKENS` per batch, each batch within `max_batch_tokens` (a row longer than the
/// budget gets a batch of its own).
pub fn plan(lens: &[usize], max_batch_tokens: usize, cost: Cost) -> Vec<Vec<usize>> {
    plan_rows(lens, max_batch_tokens, MAX_BATCH_ROWS, cost)
}

/// `plan`, with at most `max_rows` rows in a batch.
fn plan_rows(
    lens: &[usize],
    max_batch_tokens: usize,
    max_rows: usize,
    cost: Cost,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let sorted: Vec<usize> = order.iter().map(|&i| lens[i]).collect();
    let n = sorted.len();
    // summed[i]: tokens of the first i sorted rows.
    let summed: Vec<usize> = std::iter::once(0)
        .chain(sorted.iter().scan(0, |acc, &l| {
            *acc += l;
            Some(*acc)
        }))
        .collect();
    let size = |j: usize, i: usize| match cost {
        Cost::Padded => (i - j) * sorted[i - 1],
        Cost::Flat => summed[i] - summed[j],
    };
    // best[i]: least cost of the first i sorted rows; cut[i]: where their last batch starts.
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0; n + 1];
    best[0] = 0;
    for i in 1..=n {
        for j in (0..i).rev() {
            let tokens = size(j, i);
            if i - j > 1 && (tokens > max_batch_tokens || i - j > max_rows) {
                break;
            }
            let total = best[j] + tokens + BATCH_OVERHEAD_TOKENS;
            if total < best[i] {
                best[i] = total;
                cut[i] = j;
            }
        }
    }
    let mut batches = Vec::new();
    let mut i = n;
    while i > 0 {
        batches.push(order[cut[i]..i].to_vec());
        i = cut[i];
    }
    batches.reverse();
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(lens: &[usize], batches: &[Vec<usize>]) -> usize {
        batches
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| lens[i]).max().unwrap() + BATCH_OVERHEAD_TOKENS)
            .sum()
    }

    #[test]
    fn batches_respect_budget_and_cover_every_row_once() {
        let lens = [5, 1, 9, 3, 3, 20, 2, 700, 680, 30];
        let batches = plan(&lens, 1000, Cost::Padded);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 1000, "{b:?}");
        }
        // The two long rows are not padded together with the short ones.
        assert!(batches.iter().any(|b| b.contains(&7) && !b.contains(&0)));
    }

    #[test]
    fn over_budget_row_gets_its_own_batch() {
        for cost in [Cost::Padded, Cost::Flat] {
            assert_eq!(plan(&[5, 50], 10, cost), vec![vec![0], vec![1]]);
        }
    }

    #[test]
    fn plan_is_optimal_among_contiguous_cuts() {
        // Brute force over every way to cut the sorted rows.
        let lens = [3, 8, 8, 40, 41, 90, 200, 210];
        let budget = 420;
        let got = cost(&lens, &plan(&lens, budget, Cost::Padded));
        let n = lens.len();
        let mut best = usize::MAX;
        for mask in 0u32..(1 << (n - 1)) {
            let mut batches = vec![vec![0]];
            for i in 1..n {
                if mask & (1 << (i - 1)) != 0 {
                    batches.push(vec![]);
                }
                batches.last_mut().unwrap().push(i);
            }
            let ok = batches
                .iter()
                .all(|b| b.len() == 1 || b.len() * lens[*b.last().unwrap()] <= budget);
            if ok {
                best = best.min(cost(&lens, &batches));
            }
        }
        assert_eq!(got, best);
    }

    /// Flat rows: no padding to save, so the fewest batches within the budget (here the short rows'
    /// spread would make the padded plan cut them into many), every row once, in length order.
    #[test]
    fn flat_rows_fill_the_budget() {
        let lens: Vec<usize> = (0..100).map(|i| 100 + 7 * i).collect(); // 100..793
        let total: usize = lens.iter().sum();
        let budget = 10_000;
        let flat = plan(&lens, budget, Cost::Flat);
        let padded = plan(&lens, budget, Cost::Padded);
        assert_eq!(flat.len(), total.div_ceil(budget), "{flat:?}");
        assert!(
            padded.len() > 2 * flat.len(),
            "{} vs {}",
            padded.len(),
            flat.len()
        );
        let mut seen: Vec<usize> = flat.iter().flatten().copied().collect();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>(), "length order");
        seen.dedup();
        assert_eq!(seen.len(), lens.len());
        for b in &flat {
            assert!(b.iter().map(|&i| lens[i]).sum::<usize>() <= budget, "{b:?}");
        }
    }

    /// Tiny rows under a huge budget: the row cap cuts where the budget would not, and a row alone
    /// (longer than the budget) still gets its batch.
    #[test]
    fn batches_hold_at_most_the_row_cap() {
        let lens = vec![3; 10];
        for cost in [Cost::Flat, Cost::Padded] {
            let batches = plan_rows(&lens, 1_000_000, 4, cost);
            assert_eq!(batches.len(), 3, "{batches:?}");
            assert!(batches.iter().all(|b| b.len() <= 4), "{batches:?}");
            assert_eq!(plan_rows(&[50], 10, 1, cost), [vec![0]]);
        }
        assert_eq!(MAX_BATCH_ROWS, 65_535);
    }

    #[test]
    fn empty_input_gives_no_batches() {
        for cost in [Cost::Padded, Cost::Flat] {
            assert!(plan(&[], 8, cost).is_empty());
        }
    }
}
