#[qbus_rpc::service]
struct Greeter {
    name: String,
}

fn main() {}
