//! Length-bucketed batching: rows sorted by length, cut so that rows × longest row fits a token budget.

/// Groups of row indices. Rows are taken shortest first, so each batch pads little; a batch closes
/// when one more row would make rows × longest row exceed `max_batch_tokens` (a row longer than the
/// budget still gets a batch of its own).
pub fn plan(lens: &[usize], max_batch_tokens: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so the new row is the longest.
        if !current.is_empty() && (current.len() + 1) * lens[i] > max_batch_tokens {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_cover_every_row_once() {
        let lens = [5, 1, 9, 3, 3, 20, 2];
        let batches = plan(&lens, 10);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() == 1 || b.len() * longest <= 10, "{b:?}");
        }
        // Shortest rows first, and the over-budget row alone.
        assert_eq!(batches[0], vec![1, 6, 3]);
        assert_eq!(batches.last().unwrap(), &vec![5]);
    }

    #[test]
    fn empty_input_gives_no_batches() {
        assert!(plan(&[], 8).is_empty());
    }
}
