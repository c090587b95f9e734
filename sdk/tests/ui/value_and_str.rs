// What a user writes: a struct marked #[sdk::value], `&str` for a `String` parameter and
// plain integer literals. It compiles with no rkyv dependency of its own.
#[sdk::value]
struct Point {
    x: f64,
    y: f64,
}

#[sdk::remote]
fn norm(p: Point) -> f64 {
    (p.x * p.x + p.y * p.y).sqrt()
}

#[sdk::remote]
fn greet(name: String, times: u32) -> String {
    format!("{name} {times}")
}

#[sdk::remote]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

fn main() {
    let _ = || {
        let _n = norm::remote(Point { x: 3.0, y: 4.0 });
        let _g = greet::remote("bob", 2);
        let _s = add::remote(1, 2);
    };
}
