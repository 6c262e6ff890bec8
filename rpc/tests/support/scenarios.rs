//! What every invoker must do, whatever carries the calls: typed and dynamic calls,
//! application errors, clear framework errors, deadlines, and many calls at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qbus_rpc::{Encoding, ErrorCode, Invoker, RpcClient, RpcError};
use serde_json::json;

use super::greeter::{GreetError, GreeterClient, Probe};

/// Runs the named scenarios, and [`deadline`], as tests in a module named after `fixture`:
/// an async fn of the test file returning something with an `invoker` and a `probe`.
#[allow(unused_macros)] // some test files run the scenarios one by one
macro_rules! scenarios_over {
    ($fixture:ident: $($name:ident),* $(,)?) => {
        mod $fixture {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fixture = super::$fixture().await;
                    $crate::support::scenarios::$name(fixture.invoker.clone()).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn deadline() {
                let fixture = super::$fixture().await;
                $crate::support::scenarios::deadline(fixture.invoker.clone(), &fixture.probe)
                    .await;
            }
        }
    };
}
pub(crate) use scenarios_over;

/// Typed proxy calls, dynamic calls, and both encodings.
pub async fn typed_and_dynamic(invoker: Arc<dyn Invoker>) {
    let greeter = GreeterClient::from_rpc(RpcClient::from_shared(invoker.clone(), "Greeter"));
    assert_eq!(
        greeter.hello("typed".into()).await.unwrap(),
        "Hello, typed!"
    );
    assert_eq!(
        greeter
            .encoding(Encoding::Json)
            .echo(7, "json".into())
            .await
            .unwrap(),
        (7, "json".to_string())
    );
    let dynamic = RpcClient::from_shared(invoker, "Greeter");
    let value: serde_json::Value = dynamic.call("hello", &json!(["dynamic"])).await.unwrap();
    assert_eq!(value, json!("Hello, dynamic!"));
    let value: serde_json::Value = dynamic
        .clone()
        .encoding(Encoding::Json)
        .call("echo", &(1, "a"))
        .await
        .unwrap();
    assert_eq!(value, json!([1, "a"]));
}

/// A method's own `Err` arrives as the typed application error.
pub async fn application_errors(invoker: Arc<dyn Invoker>) {
    let greeter = GreeterClient::from_rpc(RpcClient::from_shared(invoker, "Greeter"));
    assert_eq!(
        greeter.check("fine".into()).await.unwrap(),
        Ok("fine".into())
    );
    assert_eq!(
        greeter.check(String::new()).await.unwrap(),
        Err(GreetError::Rejected {
            reason: "empty name".into()
        })
    );
}

fn remote(result: Result<serde_json::Value, RpcError>) -> qbus_rpc::RemoteError {
    match result {
        Err(RpcError::Remote(e)) => e,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Unknown modules and methods, and params of the wrong shape, come back as errors that
/// say what was wrong.
pub async fn unknown_method_and_bad_params(invoker: Arc<dyn Invoker>) {
    let dynamic = RpcClient::from_shared(invoker.clone(), "Greeter");
    let e = remote(dynamic.call("goodbye", &json!([])).await);
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.message.contains("\"goodbye\""), "{e}");
    assert_eq!(
        e.detail.as_deref(),
        Some("methods: check, echo, hello, slow, whoami")
    );
    // A server says it has no such module; an HA invoker, which knows the modules each
    // server registered, finds nobody to send the call to.
    match RpcClient::from_shared(invoker, "Nobody")
        .call::<_, serde_json::Value>("hello", &json!([]))
        .await
    {
        Err(RpcError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::NotFound);
            assert!(e.message.contains("\"Nobody\""), "{e}");
        }
        Err(RpcError::NoResponders { target, .. }) => assert!(target.contains("Nobody")),
        other => panic!("expected an unknown module, got {other:?}"),
    }
    let e = remote(dynamic.call("hello", &json!([5])).await);
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.message.starts_with("Greeter.hello: "), "{e}");
    assert!(
        e.detail
            .as_deref()
            .unwrap_or("")
            .contains("expected a string"),
        "{e}"
    );
    let e = remote(
        dynamic
            .call("echo", &json!(["not a number", "x", "extra"]))
            .await,
    );
    assert_eq!(e.code, ErrorCode::BadRequest);
}

/// A call fails at its deadline, and the server stops the handler.
pub async fn deadline(invoker: Arc<dyn Invoker>, probe: &Probe) {
    let limit = Duration::from_millis(300);
    let greeter =
        GreeterClient::from_rpc(RpcClient::from_shared(invoker, "Greeter")).timeout(limit);
    let started = Instant::now();
    match greeter.slow(60_000).await {
        Err(RpcError::Timeout(after)) => assert_eq!(after, limit),
        other => panic!("expected a timeout, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took >= limit, "fired early, after {took:?}");
    assert!(
        took < limit + Duration::from_secs(1),
        "fired late, after {took:?}"
    );
    super::wait_for(
        "the server to stop the handler",
        Duration::from_secs(5),
        || (probe.stopped() == 1).then_some(()),
    )
    .await;
    assert_eq!(probe.finished(), 0);
    // A later call on the same invoker is not disturbed.
    assert_eq!(greeter.slow(1).await.unwrap(), 1);
}

/// 64 calls in flight at once each get their own reply.
pub async fn concurrent_calls(invoker: Arc<dyn Invoker>) {
    let greeter = GreeterClient::from_rpc(RpcClient::from_shared(invoker, "Greeter"));
    let calls = (0..64u64).map(|i| greeter.echo(i, format!("call-{i}")));
    let replies = futures_util::future::join_all(calls).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.unwrap(), (i as u64, format!("call-{i}")));
    }
}

/// A call to a server killed at `killed` fails at once as disconnected instead of hanging.
pub async fn fails_disconnected<T: std::fmt::Debug>(
    call: tokio::task::JoinHandle<Result<T, RpcError>>,
    killed: Instant,
) {
    match call.await.unwrap() {
        Err(RpcError::Disconnected { .. }) => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "took {:?}",
        killed.elapsed()
    );
}
