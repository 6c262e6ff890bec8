#[qbus_rpc::service]
trait Greeter {
    async fn hello(&self, name: &str) -> String;
    async fn name(&self) -> &'static str;
    async fn greet(&self, who: impl ToString) -> String;
}

fn main() {}
