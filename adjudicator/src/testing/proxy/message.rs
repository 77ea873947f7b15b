//! JSON-RPC as the proxy sees it: just enough parsing of untrusted bytes to
//! tell requests, responses and notifications apart and to answer a request
//! with an error. Forwarded messages travel as received, never re-encoded.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::error::GarbageReason;

/// A client's message: one request or a batch of them.
#[derive(Debug)]
pub(super) struct RpcRequest {
    /// `(id, method)` of each request; a batch has several.
    calls: Vec<(Option<Value>, String)>,
    batch: bool,
}

impl RpcRequest {
    /// Parses a client's message; anything but a request object or a
    /// non-empty array of them is garbage.
    pub(super) fn parse(bytes: &[u8]) -> Result<Self, GarbageReason> {
        let not_rpc = GarbageReason::NotJsonRpc {
            expected: "request",
        };
        let call = |v: &Map<String, Value>| match v.get("method") {
            Some(Value::String(m)) => Ok((v.get("id").cloned(), m.clone())),
            _ => Err(not_rpc.clone()),
        };
        match parse(bytes)? {
            Value::Object(o) => Ok(Self {
                calls: vec![call(&o)?],
                batch: false,
            }),
            Value::Array(items) if !items.is_empty() => {
                let calls = items
                    .iter()
                    .map(|v| v.as_object().ok_or(not_rpc.clone()).and_then(call))
                    .collect::<Result<_, _>>()?;
                Ok(Self { calls, batch: true })
            }
            _ => Err(not_rpc),
        }
    }

    /// The methods called.
    pub(super) fn methods(&self) -> impl Iterator<Item = &str> {
        self.calls.iter().map(|(_, m)| m.as_str())
    }

    /// The error answer to this message: one error object per request (a
    /// single request without id gets `"id": null`; in a batch, requests
    /// without id, being notifications, get none).
    pub(super) fn error_response(&self, code: i64, message: &str) -> String {
        self.answer(
            |id| json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
        )
    }

    /// The answer `"result": null` to this message, per request as
    /// [`error_response`](Self::error_response) answers.
    pub(super) fn null_response(&self) -> String {
        self.answer(|id| json!({"jsonrpc": "2.0", "id": id, "result": null}))
    }

    fn answer(&self, one: impl Fn(&Value) -> Value) -> String {
        if self.batch {
            let all: Vec<Value> = self
                .calls
                .iter()
                .filter_map(|(id, _)| id.as_ref().map(&one))
                .collect();
            Value::Array(all).to_string()
        } else {
            let id = self.calls.first().and_then(|(id, _)| id.clone());
            one(&id.unwrap_or(Value::Null)).to_string()
        }
    }
}

/// What the node sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FromUpstream {
    /// An answer to a request (or a batch of answers).
    Response,
    /// A subscription's notification (`eth_subscription`).
    Notification,
}

/// Classifies a node's message: an object with a `method` and no `id` is a
/// notification, one with an `id` (or a non-empty array) a response.
pub(super) fn classify(bytes: &[u8]) -> Result<FromUpstream, GarbageReason> {
    let not_rpc = GarbageReason::NotJsonRpc {
        expected: "response or notification",
    };
    match parse(bytes)? {
        Value::Object(o) if o.contains_key("id") => Ok(FromUpstream::Response),
        Value::Object(o) if o.get("method").is_some_and(Value::is_string) => {
            Ok(FromUpstream::Notification)
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
            Ok(FromUpstream::Response)
        }
        _ => Err(not_rpc),
    }
}

fn parse(bytes: &[u8]) -> Result<Value, GarbageReason> {
    serde_json::from_slice(bytes).map_err(|e| GarbageReason::NotJson(Arc::new(e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn requests_and_their_error_answers() {
        let one = RpcRequest::parse(br#"{"jsonrpc":"2.0","id":7,"method":"eth_chainId"}"#).unwrap();
        assert_eq!(one.methods().collect::<Vec<_>>(), ["eth_chainId"]);
        let answer: Value = serde_json::from_str(&one.error_response(-32005, "x")).unwrap();
        assert_eq!(answer["id"], 7);
        assert_eq!(answer["error"]["code"], -32005);
        let batch = RpcRequest::parse(
            br#"[{"id":"a","method":"eth_blockNumber"},{"method":"eth_x"},{"id":2,"method":"eth_chainId"}]"#,
        )
        .unwrap();
        let answer: Value = serde_json::from_str(&batch.error_response(-32603, "y")).unwrap();
        let ids: Vec<_> = answer
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].clone())
            .collect();
        assert_eq!(ids, [json!("a"), json!(2)]);
    }

    #[test]
    fn null_answers_keep_ids() {
        let one = RpcRequest::parse(br#"{"id":3,"method":"eth_getTransactionReceipt"}"#).unwrap();
        let answer: Value = serde_json::from_str(&one.null_response()).unwrap();
        assert_eq!(
            (answer["id"].clone(), answer.get("result")),
            (json!(3), Some(&Value::Null))
        );
        let batch = RpcRequest::parse(br#"[{"id":1,"method":"a"},{"method":"b"}]"#).unwrap();
        let answer: Value = serde_json::from_str(&batch.null_response()).unwrap();
        assert_eq!(answer, json!([{"jsonrpc": "2.0", "id": 1, "result": null}]));
    }

    #[test]
    fn garbage_is_named() {
        for bad in [
            &b"not json"[..],
            b"",
            b"\xff\xfe",
            b"[]",
            b"42",
            b"{\"id\":1}",
            b"[{\"method\":\"a\"},3]",
        ] {
            assert!(RpcRequest::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            RpcRequest::parse(b"{").unwrap_err(),
            GarbageReason::NotJson(_)
        ));
        assert_eq!(
            classify(br#"{"jsonrpc":"2.0","method":"eth_subscription","params":{}}"#).unwrap(),
            FromUpstream::Notification
        );
        assert_eq!(
            classify(br#"{"jsonrpc":"2.0","id":1,"result":"0x1"}"#).unwrap(),
            FromUpstream::Response
        );
        assert_eq!(classify(br#"[{"id":1}]"#).unwrap(), FromUpstream::Response);
        for bad in [&b"garbage"[..], b"{}", b"[]", b"null", b"[1]"] {
            assert!(classify(bad).is_err(), "{bad:?}");
        }
    }
}
