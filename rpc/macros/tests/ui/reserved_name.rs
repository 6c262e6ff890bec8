#[qbus_rpc::service]
trait Greeter {
    async fn timeout(&self, seconds: u64) -> bool;
}

fn main() {}
