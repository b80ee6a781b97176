//! The CNI plugin's credentials: a token of its own service account from the TokenRequest API,
//! written into the kubeconfig on the host. The installer writes the first one; the node agent
//! calls [`refresh_kubeconfig`] again before it expires.

use crate::install::{write_kubeconfig, InstallError};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// How long a token is asked to live. The node agent refreshes at half this.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where a pod finds its own service account's CA.
pub const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("TokenRequest for service account {namespace}/{account} failed: {message}")]
    Request {
        namespace: String,
        account: String,
        message: String,
    },
    #[error("not running in a cluster: {0}")]
    NotInCluster(String),
    #[error(transparent)]
    Write(#[from] InstallError),
}

/// Asks the API server for a token of `namespace/account` that lives `lifetime`.
pub async fn request_token(
    client: &kube::Client,
    namespace: &str,
    account: &str,
    lifetime: Duration,
) -> Result<String, TokenError> {
    let fail = |message: String| TokenError::Request {
        namespace: namespace.to_owned(),
        account: account.to_owned(),
        message,
    };
    let body = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "expirationSeconds": lifetime.as_secs() }
    });
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token"
    ))
    .header("content-type", "application/json")
    .body(serde_json::to_vec(&body).map_err(|e| fail(e.to_string()))?)
    .map_err(|e| fail(e.to_string()))?;
    let resp: serde_json::Value = client.request(req).await.map_err(|e| fail(e.to_string()))?;
    resp["status"]["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| fail("the answer holds no status.token".into()))
}

/// The API server's address as a pod sees it.
pub fn in_cluster_server(get: impl Fn(&str) -> Option<String>) -> Result<String, TokenError> {
    let host = get("KUBERNETES_SERVICE_HOST")
        .ok_or_else(|| TokenError::NotInCluster("KUBERNETES_SERVICE_HOST is not set".into()))?;
    let port = get("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
    Ok(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// Requests a fresh token and rewrites the plugin's kubeconfig in `conf_dir` with it.
pub async fn refresh_kubeconfig(
    client: &kube::Client,
    server: &str,
    ca_pem: &[u8],
    conf_dir: &Path,
    namespace: &str,
    account: &str,
) -> Result<(), TokenError> {
    let token = request_token(client, namespace, account, TOKEN_LIFETIME).await?;
    write_kubeconfig(conf_dir, server, ca_pem, &token)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    #[tokio::test]
    async fn asks_for_a_token_of_the_plugins_account_and_writes_it() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().to_owned();
        let op = tokio::spawn(async move {
            refresh_kubeconfig(
                &client,
                "https://10.96.0.1:443",
                b"CA",
                &conf,
                "margay-system",
                "margay-cni",
            )
            .await
        });
        let (req, send) = handle.next_request().await.expect("a request");
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces/margay-system/serviceaccounts/margay-cni/token"
        );
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["spec"]["expirationSeconds"], 86400);
        send.send_response(
            Response::builder()
                .status(201)
                .body(Body::from(
                    serde_json::to_vec(&json!({"status": {"token": "fresh-token", "expirationTimestamp": "2026-11-22T00:00:00Z"}}))
                        .unwrap(),
                ))
                .unwrap(),
        );
        op.await.unwrap().unwrap();
        let text = std::fs::read_to_string(dir.path().join("margay-kubeconfig")).unwrap();
        assert!(text.contains("token: fresh-token"), "{text}");
    }

    #[tokio::test]
    async fn a_refused_request_says_which_account() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let op = tokio::spawn(async move {
            request_token(&client, "margay-system", "margay-cni", TOKEN_LIFETIME).await
        });
        let (_, send) = handle.next_request().await.expect("a request");
        send.send_response(
            Response::builder()
                .status(403)
                .body(Body::from(
                    serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "forbidden"}))
                        .unwrap(),
                ))
                .unwrap(),
        );
        let err = op.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("margay-system/margay-cni"),
            "{err}"
        );
    }

    #[test]
    fn server_address_from_the_pod_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            in_cluster_server(env(&[
                ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
                ("KUBERNETES_SERVICE_PORT", "443")
            ]))
            .unwrap(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            in_cluster_server(env(&[("KUBERNETES_SERVICE_HOST", "fd00::1")])).unwrap(),
            "https://[fd00::1]:443"
        );
        assert!(in_cluster_server(env(&[])).is_err());
    }
}
