// A type the cluster cannot carry as a task parameter: the error says so and how to fix it.
struct NotAValue {
    x: std::cell::Cell<u8>,
}

#[sdk::remote]
fn f(v: NotAValue) -> u8 {
    v.x.get()
}

fn main() {}
