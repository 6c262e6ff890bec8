#[qbus_rpc::service]
trait Greeter {
    async fn owned(self, name: String) -> String;
    async fn exclusive(&mut self, name: String) -> String;
    async fn missing(name: String) -> String;
}

fn main() {}
