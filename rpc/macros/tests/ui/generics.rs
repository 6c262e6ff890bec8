#[qbus_rpc::service]
trait Store<T> {
    async fn get(&self, key: String) -> String;
}

#[qbus_rpc::service]
trait Greeter {
    async fn hello<T: ToString>(&self, name: T) -> String;
}

fn main() {}
