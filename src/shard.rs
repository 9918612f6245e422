//! Splitting one dataset across processes: row i (counted from 0 over all inputs, in order) belongs to
//! shard i mod N, so N processes with the same inputs cover every row exactly once.

/// Shard `index` of `count`, `index` from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= K < N"));
        }
        Ok(Self { index, count })
    }

    /// `K/N`, K from 0.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (k, n) = spec
            .split_once('/')
            .ok_or_else(|| format!("bad shard {spec:?}: expected K/N, e.g. 0/4"))?;
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("bad shard {spec:?}: expected K/N"))
        };
        Self::new(num(k)?, num(n)?)
    }

    /// From a scheduler's environment: a Slurm job array (`SLURM_ARRAY_TASK_ID` less
    /// `SLURM_ARRAY_TASK_MIN`, of `SLURM_ARRAY_TASK_COUNT`), or a Kubernetes Indexed Job
    /// (`JOB_COMPLETION_INDEX`, of `count`, which Kubernetes does not put in the environment).
    pub fn from_env(
        var: impl Fn(&str) -> Option<String>,
        count: Option<usize>,
    ) -> Result<Self, String> {
        let num = |name: &str| -> Result<Option<usize>, String> {
            var(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("{name}={v:?} is not a number"))
                })
                .transpose()
        };
        if let (Some(id), Some(n)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id
                .checked_sub(min)
                .ok_or("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
            return Self::new(index, count.unwrap_or(n));
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let n = count.ok_or(
                "JOB_COMPLETION_INDEX is set: give the job's completions with --shard-count N",
            )?;
            return Self::new(index, n);
        }
        Err("--shard auto: neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT nor JOB_COMPLETION_INDEX is set".into())
    }

    pub fn keeps(&self, row: usize) -> bool {
        row % self.count == self.index
    }

    /// The file name of this shard's output.
    pub fn file_name(&self, extension: &str) -> String {
        format!("part-{}-of-{}.{extension}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_keep() {
        let s = Shard::parse("1/3").unwrap();
        assert_eq!(
            (0..7).filter(|&i| s.keeps(i)).collect::<Vec<_>>(),
            vec![1, 4]
        );
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("x").is_err());
        assert_eq!(s.file_name("parquet"), "part-1-of-3.parquet");
    }

    #[test]
    fn from_scheduler_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
        ]);
        assert_eq!(
            Shard::from_env(slurm, None).unwrap(),
            Shard { index: 4, count: 8 }
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            Shard::from_env(k8s, Some(4)).unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "2")]), None).is_err());
        assert!(Shard::from_env(env(&[]), None).is_err());
    }
}
