//! The agent's HTTP endpoints: `/livez`, `/readyz` and `/metrics` (Prometheus text). A few
//! fixed paths over HTTP/1.1, answered and closed; nothing here needs a framework.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the endpoints answer with, asked afresh for every request.
pub trait Endpoints: Send + Sync + 'static {
    /// `Ok` while the agent's loop is alive.
    fn live(&self) -> Result<(), String>;
    /// `Ok` once the agent has synced and programmed the kernel.
    fn ready(&self) -> Result<(), String>;
    /// The Prometheus exposition.
    fn metrics(&self) -> String;
}

/// Serves `endpoints` on `addr` until the task is dropped. Returns the bound address (useful
/// with port 0).
pub async fn serve(
    addr: SocketAddr,
    endpoints: Arc<dyn Endpoints>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body, ctype) = respond(endpoints.as_ref(), path);
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}

fn respond(e: &dyn Endpoints, path: &str) -> (&'static str, String, &'static str) {
    let text = "text/plain; charset=utf-8";
    let check = |r: Result<(), String>| match r {
        Ok(()) => ("200 OK", "ok\n".to_owned(), text),
        Err(why) => ("503 Service Unavailable", format!("{why}\n"), text),
    };
    match path.split('?').next().unwrap_or("") {
        "/livez" | "/healthz" => check(e.live()),
        "/readyz" => check(e.ready()),
        "/metrics" => ("200 OK", e.metrics(), "text/plain; version=0.0.4"),
        _ => ("404 Not Found", "not found\n".to_owned(), text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Fake(AtomicBool);
    impl Endpoints for Fake {
        fn live(&self) -> Result<(), String> {
            Ok(())
        }
        fn ready(&self) -> Result<(), String> {
            if self.0.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not synced yet".into())
            }
        }
        fn metrics(&self) -> String {
            "margay_test 1\n".into()
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_probes_and_metrics() {
        let fake = Arc::new(Fake(AtomicBool::new(false)));
        let (addr, _task) = serve("127.0.0.1:0".parse().unwrap(), fake.clone())
            .await
            .unwrap();
        assert!(get(addr, "/livez").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("not synced yet\n"),
            "{r}"
        );
        fake.0.store(true, Ordering::SeqCst);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.ends_with("margay_test 1\n"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
