#[qbus_rpc::service(version = 2)]
trait Greeter {
    async fn hello(&self, name: String) -> String;
}

fn main() {}
