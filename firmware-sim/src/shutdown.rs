//! Stopping cleanly: the first Ctrl-C or SIGTERM asks a run to stop (finish in-flight publishes,
//! disconnect, print totals); a second one exits at once.

use tokio::sync::watch;

/// A cloneable "please stop" flag that tasks can poll or await.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Set by Ctrl-C or SIGTERM. Must be called inside a tokio runtime.
    pub fn on_signals() -> Self {
        let (tx, shutdown) = Self::manual();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping: finishing in-flight messages (signal again to exit at once)");
            let _ = tx.send(true);
            wait_for_signal().await;
            std::process::exit(130);
        });
        shutdown
    }

    /// Set by sending `true`; for embedding the runners in other programs and tests.
    pub fn manual() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Shutdown(rx))
    }

    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once a stop was requested; never, if the sender is gone without asking.
    pub async fn requested(&mut self) {
        if self.0.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops cleanly"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
