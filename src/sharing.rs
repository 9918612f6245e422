//! Prefix sharing (`--prefix-sharing auto`): which rows of a window share a prompt, and how to run them
//! so that each shared prompt is computed once.
//!
//! ArmoRM reads its gating at the assistant header, which depends on the prompt's tokens alone, and
//! with causal attention the prompt's keys and values are the same for every response to it. So rows
//! whose ids are equal up to the end of the gating pattern (the prompt and the assistant header) form a
//! group: the prefix runs once, every layer's keys and values are kept, and the responses run against
//! them. The results are those of running each row whole.

use std::collections::HashMap;

use crate::batch::{self, Cost, BATCH_OVERHEAD_TOKENS};
use crate::encoder::Encoded;

/// Rows (indices into the window's encoded rows) whose first `prefix` ids are equal; two or more.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub rows: Vec<usize>,
    pub prefix: usize,
}

impl Group {
    /// Tokens not computed thanks to sharing: the prefix once instead of once per row.
    pub fn saved_tokens(&self) -> usize {
        (self.rows.len() - 1) * self.prefix
    }
}

/// Groups whose prefixes run in one pass and stay cached together while their rows' continuations
/// run in `batches`: (row, its group's place in `groups`), each batch within the token budget together
/// with the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub groups: Vec<Group>,
    pub batches: Vec<Vec<(usize, usize)>>,
}

impl Unit {
    /// Padded tokens of the prefix pass (prefixes × longest prefix).
    pub fn prefix_tokens(&self) -> usize {
        let longest = self.groups.iter().map(|g| g.prefix).max().unwrap_or(0);
        self.groups.len() * longest
    }

    /// Tokens held in the cache while the continuations run.
    pub fn cached_tokens(&self) -> usize {
        self.groups.iter().map(|g| g.prefix).sum()
    }
}

/// A window's work: rows run whole, in length-bucketed batches as without sharing, and shared units.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub plain: Vec<usize>,
    pub units: Vec<Unit>,
}

/// Groups the rows by their prefix up to the end of the gating pattern (`pattern_len` ids from the
/// gate) and plans the shared work within `budget` tokens per pass (counted as `cost` says), cache
/// included. A row
/// whose prompt no other row has runs whole, as without sharing; so does everything when sharing would
/// save less than one forward pass costs.
pub fn plan(rows: &[&Encoded], pattern_len: usize, budget: usize, cost: Cost) -> Plan {
    let (groups, plain) = group(rows, pattern_len);
    let saved: usize = groups.iter().map(Group::saved_tokens).sum();
    if saved < BATCH_OVERHEAD_TOKENS {
        return Plan {
            plain: (0..rows.len()).collect(),
            units: Vec::new(),
        };
    }
    let units = pack(groups, budget, cost)
        .into_iter()
        .map(|groups| continuations(rows, groups, budget, cost))
        .collect();
    Plan { plain, units }
}

/// Groups of two or more rows with equal prefixes (in order of their first row), and the other rows.
fn group(rows: &[&Encoded], pattern_len: usize) -> (Vec<Group>, Vec<usize>) {
    let mut by_prefix: HashMap<&[u32], usize> = HashMap::new();
    let mut groups: Vec<Group> = Vec::new();
    let mut plain = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let prefix = row.gate + pattern_len;
        // A row must keep at least one token after the prefix: its last token gives the rewards.
        if prefix >= row.ids.len() {
            plain.push(i);
            continue;
        }
        let g = *by_prefix.entry(&row.ids[..prefix]).or_insert_with(|| {
            groups.push(Group {
                rows: Vec::new(),
                prefix,
            });
            groups.len() - 1
        });
        groups[g].rows.push(i);
    }
    let (shared, single): (Vec<Group>, Vec<Group>) =
        groups.into_iter().partition(|g| g.rows.len() > 1);
    plain.extend(single.into_iter().flat_map(|g| g.rows));
    plain.sort_unstable();
    (shared, plain)
}

/// Groups packed into units as rows are into batches (`batch::plan`: sorted by length, cut where
/// the passes cost least) within half the budget: a unit's prefix pass and its cache take at most that,
/// and its continuations keep the other half. A group too large for that gets a unit of its own.
fn pack(groups: Vec<Group>, budget: usize, cost: Cost) -> Vec<Vec<Group>> {
    let lens: Vec<usize> = groups.iter().map(|g| g.prefix).collect();
    let mut slots: Vec<Option<Group>> = groups.into_iter().map(Some).collect();
    batch::plan(&lens, (budget / 2).max(1), cost)
        .into_iter()
        .map(|unit| unit.into_iter().filter_map(|g| slots[g].take()).collect())
        .collect()
}

/// The continuations of a unit's rows in length-bucketed batches, each within what the cache leaves
/// of the budget (a row longer than that gets a batch of its own, as without sharing).
fn continuations(rows: &[&Encoded], groups: Vec<Group>, budget: usize, cost: Cost) -> Unit {
    let members: Vec<(usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| group.rows.iter().map(move |&r| (r, g)))
        .collect();
    let lens: Vec<usize> = members
        .iter()
        .map(|&(r, g)| rows[r].ids.len() - groups[g].prefix)
        .collect();
    let cached: usize = groups.iter().map(|g| g.prefix).sum();
    let batches = batch::plan(&lens, budget.saturating_sub(cached).max(1), cost)
        .into_iter()
        .map(|b| b.into_iter().map(|i| members[i]).collect())
        .collect();
    Unit { groups, batches }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row: `prompt` ids, the 2-token gating pattern [90, 91], then `response` ids.
    fn row(prompt: &[u32], response: &[u32]) -> Encoded {
        let mut ids = prompt.to_vec();
        ids.extend([90, 91]);
        ids.extend_from_slice(response);
        Encoded {
            ids,
            gate: prompt.len(),
        }
    }

    fn long(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    #[test]
    fn rows_sharing_a_prompt_are_grouped_wherever_they_sit() {
        let (a, b) = (long(1, 60), long(2, 40));
        let rows = [
            row(&a, &[1, 2]),
            row(&b, &[3]),
            row(&long(3, 50), &[4]),
            row(&a, &[5, 6, 7]),
            row(&b, &[8, 9]),
            row(&a, &[1, 2]),
        ];
        let refs: Vec<&Encoded> = rows.iter().collect();
        let plan = plan(&refs, 2, 10_000, Cost::Padded);
        assert_eq!(plan.plain, [2]);
        assert_eq!(plan.units.len(), 1);
        let unit = &plan.units[0];
        // Shortest prefix first: b's group (42 tokens), then a's (62).
        let groups: Vec<(Vec<usize>, usize)> = unit
            .groups
            .iter()
            .map(|g| (g.rows.clone(), g.prefix))
            .collect();
        assert_eq!(groups, [(vec![1, 4], 42), (vec![0, 3, 5], 62)]);
        let saved: usize = unit.groups.iter().map(Group::saved_tokens).sum();
        assert_eq!(saved, 42 + 2 * 62);
        let mut all: Vec<(usize, usize)> = unit.batches.concat();
        all.sort();
        assert_eq!(all, [(0, 1), (1, 0), (3, 1), (4, 0), (5, 1)]);
        assert_eq!((unit.prefix_tokens(), unit.cached_tokens()), (2 * 62, 104));
    }

    #[test]
    fn sharing_that_saves_less_than_a_pass_is_not_done() {
        // Two rows share a 4-token prefix: 4 tokens saved, less than one pass's overhead.
        let rows = [row(&[1, 2], &[3]), row(&[1, 2], &[4]), row(&[7], &[8])];
        let refs: Vec<&Encoded> = rows.iter().collect();
        let plan = plan(&refs, 2, 10_000, Cost::Padded);
        assert_eq!(plan.plain, [0, 1, 2]);
        assert!(plan.units.is_empty());
    }

    #[test]
    fn a_row_with_nothing_after_the_pattern_runs_whole() {
        let p = long(1, 100);
        let rows = [row(&p, &[]), row(&p, &[1]), row(&p, &[2])];
        let refs: Vec<&Encoded> = rows.iter().collect();
        let plan = plan(&refs, 2, 10_000, Cost::Padded);
        assert_eq!(plan.plain, [0]);
        assert_eq!(plan.units[0].groups[0].rows, [1, 2]);
    }

    #[test]
    fn units_and_batches_keep_the_cache_within_the_budget() {
        // Ten prompts of 98 + 2 tokens, four responses each of 30 tokens, budget 400: a unit caches at
        // most 200 tokens (two prefixes), and its continuation batches fit in the 200 left.
        let rows: Vec<Encoded> = (0..40)
            .map(|i| row(&long(i % 10, 98), &long(100 + i, 30)))
            .collect();
        let refs: Vec<&Encoded> = rows.iter().collect();
        let plan = plan(&refs, 2, 400, Cost::Padded);
        assert!(plan.plain.is_empty());
        assert_eq!(plan.units.len(), 5);
        for unit in &plan.units {
            assert!(unit.prefix_tokens() <= 400 && 2 * unit.cached_tokens() <= 400);
            for b in &unit.batches {
                assert!(b.len() * 30 + unit.cached_tokens() <= 400, "{b:?}");
            }
        }
        let mut all: Vec<usize> = plan
            .units
            .iter()
            .flat_map(|u| u.batches.concat())
            .map(|(r, _)| r)
            .collect();
        all.sort();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_group_larger_than_the_budget_is_split_into_batches() {
        // One 300-token prefix, budget 320: the cache alone leaves 20 tokens, so each 30-token response
        // gets a batch of its own, and the prefix still runs once.
        let p = long(1, 298);
        let rows: Vec<Encoded> = (0..3).map(|i| row(&p, &long(10 + i, 30))).collect();
        let refs: Vec<&Encoded> = rows.iter().collect();
        let plan = plan(&refs, 2, 320, Cost::Padded);
        assert_eq!(plan.units.len(), 1);
        assert_eq!(plan.units[0].batches.len(), 3);
        assert_eq!(plan.units[0].groups[0].saved_tokens(), 600);
    }
}
