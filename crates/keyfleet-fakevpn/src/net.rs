//! Listening, serving connections (plain or TLS) with hyper-util, refusing and shutting down.

use std::{
    collections::HashMap, future::poll_fn, io, net::SocketAddr, sync::Arc, task::Poll,
    time::Duration,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Handle,
    sync::{Notify, watch},
    task::AbortHandle,
};
use tokio_rustls::TlsAcceptor;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections to finish before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

pub(crate) struct Net {
    addr: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    runtime: Handle,
    /// Becomes true on shutdown; held responses and connections end early on it.
    closing: watch::Receiver<bool>,
    listening: Mutex<Listening>,
    conns: Mutex<Conns>,
    drained: Notify,
}

#[derive(Default)]
struct Listening {
    /// Owned here rather than by the accept task, so that dropping it (and so closing the port)
    /// happens synchronously in `set_refusing(true)`.
    listener: Option<TcpListener>,
    accept_task: Option<AbortHandle>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    open: HashMap<u64, AbortHandle>,
}

impl Net {
    /// Binds 127.0.0.1 on a free port and starts accepting. Must run inside a tokio runtime.
    pub fn start(
        router: Router,
        tls: Option<TlsAcceptor>,
        closing: watch::Receiver<bool>,
    ) -> io::Result<Arc<Net>> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let net = Arc::new(Net {
            addr: listener.local_addr()?,
            router,
            tls,
            runtime: Handle::current(),
            closing,
            listening: Mutex::default(),
            conns: Mutex::default(),
            drained: Notify::new(),
        });
        net.listen_on(listener);
        Ok(net)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `true`: close the port and cut open connections; `false`: listen on the same port again.
    pub fn set_refusing(self: &Arc<Self>, refusing: bool) {
        if refusing {
            self.stop();
            return;
        }
        if self.listening.lock().listener.is_some() {
            return;
        }
        let _runtime = self.runtime.enter();
        match bind(self.addr) {
            Ok(listener) => self.listen_on(listener),
            Err(error) => {
                tracing::error!(%error, addr = %self.addr, "Fake server could not listen again.")
            }
        }
    }

    /// Stops listening and cuts every open connection at once.
    pub fn stop(&self) {
        self.stop_listening();
        for (_, task) in self.conns.lock().open.drain() {
            task.abort();
        }
    }

    /// Stops listening, lets open connections finish for a grace period, then cuts the rest.
    /// The caller has already signalled `closing`.
    pub async fn shutdown(&self) {
        self.stop_listening();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.drained())
            .await
            .is_err()
        {
            tracing::warn!(addr = %self.addr, "Fake server cut connections still open after the grace period.");
        }
        self.stop();
    }

    fn listen_on(self: &Arc<Self>, listener: TcpListener) {
        let mut listening = self.listening.lock();
        listening.listener = Some(listener);
        let task = self.runtime.spawn(accept_loop(Arc::clone(self)));
        if let Some(old) = listening.accept_task.replace(task.abort_handle()) {
            old.abort();
        }
    }

    fn stop_listening(&self) {
        let mut listening = self.listening.lock();
        listening.listener = None;
        if let Some(task) = listening.accept_task.take() {
            task.abort();
        }
    }

    async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.conns.lock().open.is_empty() {
                return;
            }
            notified.await;
        }
    }

    fn spawn_connection(self: &Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        // Held while spawning, so the task cannot deregister before it is registered.
        let mut conns = self.conns.lock();
        let id = conns.next_id;
        conns.next_id += 1;
        let net = Arc::clone(self);
        let task = self.runtime.spawn(async move {
            let _open = OpenConnection { net: &net, id };
            net.serve(stream).await;
        });
        conns.open.insert(id, task.abort_handle());
    }

    async fn serve(&self, stream: TcpStream) {
        let Some(acceptor) = &self.tls else {
            return drive(
                TokioIo::new(stream),
                self.router.clone(),
                self.closing.clone(),
            )
            .await;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                drive(TokioIo::new(tls), self.router.clone(), self.closing.clone()).await
            }
            Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed."),
            Err(_) => tracing::debug!("TLS handshake timed out."),
        }
    }
}

struct OpenConnection<'a> {
    net: &'a Net,
    id: u64,
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        let mut conns = self.net.conns.lock();
        conns.open.remove(&self.id);
        if conns.open.is_empty() {
            self.net.drained.notify_one();
        }
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    // Rebinding the port after `set_refusing(true)` must work while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(net: Arc<Net>) {
    loop {
        let accepted = poll_fn(|cx| match net.listening.lock().listener.as_ref() {
            Some(listener) => listener.poll_accept(cx).map(Some),
            None => Poll::Ready(None),
        })
        .await;
        match accepted {
            Some(Ok((stream, _))) => net.spawn_connection(stream),
            Some(Err(error)) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::debug!(%error, "Accept failed.");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None => return,
        }
    }
}

async fn drive<I>(io: I, router: Router, mut closing: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut conn = std::pin::pin!(builder.serve_connection(io, TowerToHyperService::new(router)));
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "Connection ended with an error.");
            }
        }
        _ = wait_closing(&mut closing) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

pub(crate) async fn wait_closing(closing: &mut watch::Receiver<bool>) {
    let _ = closing.wait_for(|closing| *closing).await;
}
