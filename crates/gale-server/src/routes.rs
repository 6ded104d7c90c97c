//! Route tables: which WebSocket behaviour or HTTP handler serves a path.

use crate::behavior::Behavior;
use crate::handler::{ErrorRenderer, HttpHandler, HttpResponse};
use crate::timer::ticks;
use crate::websocket::ErasedHandler;

/// A path pattern: exact (`/healthz`) or a prefix ending in `*` (`/api/publish/*`, `/*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub(crate) fn parse(pattern: &str) -> Pattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_string()),
            None => Pattern::Exact(pattern.to_string()),
        }
    }

    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            Pattern::Exact(p) => p == path,
            Pattern::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

pub(crate) struct WsRoute {
    pub(crate) pattern: Pattern,
    pub(crate) behavior: Behavior,
    pub(crate) ticks: RouteTicks,
    pub(crate) handler: Box<dyn ErasedHandler>,
}

/// A behaviour's timeouts in timer-wheel ticks, computed once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RouteTicks {
    pub(crate) idle: Option<u32>,
    pub(crate) ping: Option<u32>,
    pub(crate) pong: u32,
    pub(crate) close: u32,
    pub(crate) message: Option<u32>,
    pub(crate) backpressure: u32,
}

impl RouteTicks {
    pub(crate) fn of(b: &Behavior) -> Self {
        RouteTicks {
            idle: b.idle_timeout.map(ticks),
            ping: b.ping_interval.map(ticks),
            pong: ticks(b.pong_timeout),
            close: ticks(b.close_timeout),
            message: b.message_timeout.map(ticks),
            backpressure: ticks(b.backpressure_timeout),
        }
    }
}

pub(crate) struct HttpRoute {
    pub(crate) method: String,
    pub(crate) pattern: Pattern,
    pub(crate) handler: Box<dyn HttpHandler>,
}

/// What an HTTP lookup found.
pub(crate) enum HttpMatch {
    Found(usize),
    /// The path exists, but not for this method; the methods it has.
    WrongMethod(String),
    NotFound,
}

/// Paths whose error answers the application renders itself.
pub(crate) struct ErrorRoute {
    pub(crate) pattern: Pattern,
    pub(crate) renderer: Box<dyn ErrorRenderer>,
}

/// Every route of an app, shared by all loops.
#[derive(Default)]
pub(crate) struct Routes {
    pub(crate) ws: Vec<WsRoute>,
    pub(crate) http: Vec<HttpRoute>,
    pub(crate) errors: Vec<ErrorRoute>,
}

impl Routes {
    /// The first WebSocket route matching `path`, in the order they were added.
    pub(crate) fn find_ws(&self, path: &str) -> Option<usize> {
        self.ws.iter().position(|r| r.pattern.matches(path))
    }

    /// The first HTTP route matching `method` and `path`. HEAD is served by GET routes.
    pub(crate) fn find_http(&self, method: &str, path: &str) -> HttpMatch {
        let method = if method == "HEAD" { "GET" } else { method };
        let mut allowed: Vec<&str> = Vec::new();
        for (i, r) in self.http.iter().enumerate() {
            if r.pattern.matches(path) {
                if r.method == method {
                    return HttpMatch::Found(i);
                }
                if !allowed.contains(&r.method.as_str()) {
                    allowed.push(&r.method);
                }
            }
        }
        if allowed.is_empty() { HttpMatch::NotFound } else { HttpMatch::WrongMethod(allowed.join(", ")) }
    }

    /// The server's own error answer to a request for `path`, rendered by the first error
    /// route that matches it; `None` (the server's plain-text answer) when none does.
    pub(crate) fn render_error(&self, path: &str, status: u16, reason: &str) -> Option<HttpResponse> {
        let route = self.errors.iter().find(|r| r.pattern.matches(path))?;
        Some(route.renderer.render(status, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(Pattern::parse("/healthz").matches("/healthz"));
        assert!(!Pattern::parse("/healthz").matches("/healthz/x"));
        assert!(Pattern::parse("/api/*").matches("/api/publish/x"));
        assert!(!Pattern::parse("/api/*").matches("/ap"));
        assert!(Pattern::parse("/*").matches("/"));
    }
}
