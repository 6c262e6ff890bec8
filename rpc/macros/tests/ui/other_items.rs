#[qbus_rpc::service]
trait Greeter {
    const GREETING: &'static str;
    type Name;
    async fn hello(&self, name: String) -> String;
}

fn main() {}
