//! The Prometheus endpoint: a small HTTP/1.1 responder on `metrics.listen`.
//!
//! Scrapers send one `GET /metrics` per connection (or a few, with keep-alive); a full HTTP
//! stack would be a heavy dependency for that. Each connection is served by its own task: the
//! request head is read (at most 8 KiB, within 5 s), `GET /metrics` gets the exposition text of
//! [`super::prometheus::render`], any other path a 404 and any other method a 405, and the
//! connection is closed after the answer. Known shortcoming: no keep-alive and no TLS or
//! authentication; bind it to a loopback or management address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::Metrics;
use super::prometheus::{CONTENT_TYPE, render};

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The running endpoint; dropping it (or [`MetricsServer::stop`]) closes the listener.
pub struct MetricsServer {
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `listen` (`address:port`; port 0 picks a free one) and starts serving.
    pub async fn start(listen: &str, metrics: Arc<Metrics>) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        info!(address = %local, "Prometheus metrics on http://{local}/metrics");
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let metrics = Arc::clone(&metrics);
                        tokio::spawn(async move {
                            if let Err(error) = serve(stream, &metrics).await {
                                debug!(%peer, %error, "metrics request not answered");
                            }
                        });
                    }
                    Err(error) => {
                        warn!(%error, "metrics endpoint cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(MetricsServer { local, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request, one answer.
async fn serve(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head"))??;
    let (status, content_type, body) = match route(&head) {
        Route::Metrics => ("200 OK", CONTENT_TYPE, render(metrics)),
        Route::NotFound => ("404 Not Found", "text/plain", "not found; try /metrics\n".into()),
        Route::BadMethod => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n".into()),
    };
    let allow = if status.starts_with("405") { "Allow: GET\r\n" } else { "" };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the blank line that ends the head, or [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
    BadRequest,
}

/// Routes on the request line: `GET /metrics` (a query string is ignored).
fn route(head: &str) -> Route {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::BadMethod;
    }
    match target.split('?').next() {
        Some("/metrics") => Route::Metrics,
        _ => Route::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_on_method_and_path() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route("hello\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
    }

    #[tokio::test]
    async fn answers_a_scrape_over_tcp() {
        let metrics = Metrics::new();
        metrics.stream("door").classified.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        let server = MetricsServer::start("127.0.0.1:0", metrics).await.expect("binds");
        let address = server.local_addr();
        let get = |path: &'static str| async move {
            let mut stream = TcpStream::connect(address).await.expect("connects");
            let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("request sent");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("answer read");
            answer
        };
        let answer = get("/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("edgesight_frames_classified_total{stream=\"door\"} 2"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404 "));
        server.stop();
    }
}
