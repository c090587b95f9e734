//! Monte-Carlo pi: `N` tasks each throw `SAMPLES` darts at the unit square and count those
//! inside the quarter circle. Run as a job:
//!
//! ```sh
//! rayctl job submit -- target/release/pi 16 1000000
//! ```

/// A small deterministic generator (xorshift64*), so each task is reproducible by its seed.
fn next(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
}

#[sdk::remote]
fn sample(seed: u64, samples: u64) -> u64 {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..samples)
        .filter(|_| {
            let (x, y) = (next(&mut s), next(&mut s));
            x * x + y * y <= 1.0
        })
        .count() as u64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let session = sdk::init()?;
    let mut args = std::env::args().skip(1);
    let tasks: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(8);
    let samples: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let start = std::time::Instant::now();
    let refs: Vec<_> = (0..tasks).map(|i| sample::remote(i, samples)).collect();
    let inside: u64 = sdk::get_all(&refs)?.into_iter().sum();
    let pi = 4.0 * inside as f64 / (tasks * samples) as f64;
    println!(
        "pi ≈ {pi:.6} from {} samples in {tasks} tasks ({:.2?}, node {})",
        tasks * samples,
        start.elapsed(),
        session.node_address()
    );
    if (pi - std::f64::consts::PI).abs() > 0.01 {
        return Err(format!("pi estimate {pi} is off by more than 0.01").into());
    }
    Ok(())
}
