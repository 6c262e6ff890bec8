pub struct Name(String);

#[qbus_rpc::service]
trait Greeter {
    async fn hello(&self, name: Name) -> String;
}

fn main() {}
