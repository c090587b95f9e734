//! A user type through tasks: `#[sdk::value]` is all a struct needs to be an argument or a
//! result. Each task gets a `Segment` and returns a `Stats`; the driver merges them. Run as a
//! job:
//!
//! ```sh
//! rayctl job submit -- target/release/points 8
//! ```

/// A segment of the line y = slope · x + offset, sampled at `n` points.
#[sdk::value]
#[derive(Debug, Clone)]
struct Segment {
    label: String,
    from: f64,
    to: f64,
    n: u32,
    slope: f64,
    offset: f64,
}

#[sdk::value]
#[derive(Debug, Default)]
struct Stats {
    label: String,
    count: u64,
    sum_y: f64,
    max_y: f64,
}

#[sdk::remote]
fn measure(s: Segment) -> Stats {
    let step = (s.to - s.from) / f64::from(s.n.max(2) - 1);
    let ys: Vec<f64> = (0..s.n)
        .map(|i| s.slope * (s.from + step * f64::from(i)) + s.offset)
        .collect();
    Stats {
        label: s.label,
        count: ys.len() as u64,
        sum_y: ys.iter().sum(),
        max_y: ys.iter().copied().fold(f64::MIN, f64::max),
    }
}

/// A `&str` argument and a plain integer literal, as Ray programs write them.
#[sdk::remote]
fn greet(name: String, times: u32) -> String {
    format!("hello {name} ×{times}")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _session = sdk::init()?;
    let parts: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(4);
    let refs: Vec<_> = (0..parts)
        .map(|i| {
            measure::remote(Segment {
                label: format!("part-{i}"),
                from: f64::from(i),
                to: f64::from(i + 1),
                n: 11,
                slope: 2.0,
                offset: 1.0,
            })
        })
        .collect();
    let stats = sdk::get_all(&refs)?;
    let count: u64 = stats.iter().map(|s| s.count).sum();
    let sum: f64 = stats.iter().map(|s| s.sum_y).sum();
    let max = stats.iter().map(|s| s.max_y).fold(f64::MIN, f64::max);
    println!(
        "{} parts ({}…{}): {count} points, mean y {:.3}, max y {max:.3}",
        stats.len(),
        stats.first().map_or("", |s| s.label.as_str()),
        stats.last().map_or("", |s| s.label.as_str()),
        sum / count as f64
    );
    println!("{}", sdk::get(&greet::remote("points", 3))?);
    Ok(())
}
