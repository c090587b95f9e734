//! Map-reduce with the SDK's Ray semantics: options written where the functions are
//! defined, the mappers' results passed to one reducer as a `Vec<ObjectRef>` (refs inside
//! a value; the reducer borrows them), and one actor handle passed to every mapper, which
//! reports its progress to it.
//!
//! ```sh
//! rayctl job submit -- "$PWD/target/release/mapreduce" 8 100000
//! ```

use sdk::ObjectRef;

/// Counts the mappers' reports.
pub struct Progress {
    done: u64,
}

#[sdk::actor(max_concurrency = 1)]
impl Progress {
    fn new() -> Self {
        Progress { done: 0 }
    }

    fn report(&mut self, _part: u64) -> u64 {
        self.done += 1;
        self.done
    }

    fn done(&self) -> u64 {
        self.done
    }
}

/// The sum of the squares of part `part` of 0..n, cut into `parts`; tells `progress`.
#[sdk::remote(num_cpus = 1, max_retries = 2)]
fn map(part: u64, parts: u64, n: u64, progress: ProgressHandle) -> u64 {
    let (lo, hi) = (n * part / parts, n * (part + 1) / parts);
    let sum = (lo..hi).map(|x| x * x % 1_000_003).sum();
    sdk::get(&progress.report(part)).expect("report progress");
    sum
}

/// Adds up the mappers' results: it gets their refs, not their values.
#[sdk::remote(num_cpus = 1)]
fn reduce(parts: Vec<ObjectRef<u64>>) -> u64 {
    parts
        .iter()
        .map(|r| sdk::get(r).expect("a mapper's result"))
        .sum()
}

fn main() -> Result<(), sdk::Error> {
    let _session = sdk::init()?;
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or(0))
        .collect();
    let (parts, n) = match args[..] {
        [p, n, ..] if p > 0 => (p, n),
        _ => (8, 100_000),
    };
    let progress = Progress::remote()?;
    let mapped: Vec<ObjectRef<u64>> = (0..parts)
        .map(|p| map::remote(p, parts, n, progress.clone()))
        .collect();
    let total = sdk::get(&reduce::remote(mapped))?;
    let expect: u64 = (0..n).map(|x| x * x % 1_000_003).sum();
    let reports = sdk::get(&progress.done())?;
    println!("{parts} parts of 0..{n}: sum {total} (expected {expect}), {reports} reports");
    if total != expect || reports != parts {
        std::process::exit(1);
    }
    Ok(())
}
