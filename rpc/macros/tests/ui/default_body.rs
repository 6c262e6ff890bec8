#[qbus_rpc::service]
trait Greeter {
    async fn hello(&self, name: String) -> String {
        format!("Hello, {name}!")
    }
}

fn main() {}
