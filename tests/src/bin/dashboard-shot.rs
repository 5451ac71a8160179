//! `dashboard-shot`: the README's screenshot of the dashboard, taken after
//! a few minutes of made-up but realistic load, so that the charts have
//! something to show: deploys that queue behind each other, a GPU
//! semaphore, readers and a writer on a schema lock, a cron job that
//! grants many times a second, a nightly report with labels, a waiter
//! that will give up.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p padlock-e2e --bin dashboard-shot -- [SECONDS] [OUT.png]
//! ```
//!
//! Defaults: 180 seconds, `docs/dashboard.png`. Needs Chromium and
//! chromedriver, as the dashboard tests do.

use padlock::Client;
use padlock_e2e::Server;
use padlock_e2e::http::token_file;
use padlock_e2e::webdriver::{Browser, Driver, browser};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A small xorshift: load that varies, reproducibly, without a crate.
struct Dice(u64);

impl Dice {
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo + 1))
    }
}

/// One kind of work: a lock taken over and over, held for `hold` and
/// paused for `pause` (ranges in ms).
#[derive(Clone, Copy)]
struct Work {
    name: &'static str,
    semaphore: Option<u32>,
    shared: bool,
    hold: (u64, u64),
    pause: (u64, u64),
}

impl Work {
    fn new(name: &'static str, hold: (u64, u64), pause: (u64, u64)) -> Work {
        Work {
            name,
            semaphore: None,
            shared: false,
            hold,
            pause,
        }
    }

    /// `who` does this work until `end`.
    fn run(
        self,
        client: Client,
        who: String,
        seed: u64,
        end: Instant,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut dice = Dice(seed | 1);
            while Instant::now() < end {
                let mut lock = client.lock(self.name).owner(&who);
                if let Some(limit) = self.semaphore {
                    lock = lock.semaphore(limit);
                }
                if self.shared {
                    lock = lock.shared();
                }
                if let Ok(guard) = lock.acquire().await {
                    tokio::time::sleep(dice.ms(self.hold.0, self.hold.1)).await;
                    let _ = guard.release().await;
                }
                tokio::time::sleep(dice.ms(self.pause.0, self.pause.1)).await;
            }
        })
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map_or(180, |s| s.parse().expect("SECONDS"));
    let out = args.next().map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/dashboard.png"),
        PathBuf::from,
    );
    let (chromium, chromedriver) = browser().expect("Chromium and chromedriver");
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "screenshot-admin-token");
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    let shoot = Instant::now() + Duration::from_secs(seconds);
    // The load goes on while the page is read, and is stopped after.
    let end = shoot + Duration::from_secs(120);
    println!("padlockd at {}; load for {seconds} s", server.url);

    let mut workers = Vec::new();
    let client = server.client().await;
    let deploy = Work::new("deploy/prod", (2000, 6000), (500, 4000));
    for (i, runner) in [3, 7, 9].into_iter().enumerate() {
        workers.push(deploy.run(
            client.clone(),
            format!("deploy@ci-runner-{runner}"),
            11 + i as u64,
            end,
        ));
    }
    let gpu = Work {
        semaphore: Some(4),
        ..Work::new("gpu", (1000, 5000), (200, 2500))
    };
    for (i, job) in [
        "train-resnet",
        "train-bert",
        "eval-llm",
        "train-vit",
        "tune-gpt",
        "embed-docs",
    ]
    .into_iter()
    .enumerate()
    {
        workers.push(gpu.run(client.clone(), format!("{job}@gpu-box"), 23 + i as u64, end));
    }
    let read = Work {
        shared: true,
        ..Work::new("db/schema", (300, 2500), (100, 800))
    };
    for (i, who) in ["reporting@db-2", "backup@db-3", "analytics@db-4"]
        .into_iter()
        .enumerate()
    {
        workers.push(read.run(client.clone(), who.into(), 37 + i as u64, end));
    }
    let migrate = Work::new("db/schema", (200, 600), (8000, 15000));
    workers.push(migrate.run(client.clone(), "migrate@deploy-1".into(), 41, end));
    let cron = Work::new("cron/cleanup", (5, 40), (20, 80));
    for i in 0..3 {
        workers.push(cron.run(client.clone(), format!("cleanup[{i}]@cron-1"), 53 + i, end));
    }
    let cache = Work::new("cache/warm", (50, 400), (100, 600));
    let host = "padlock[9189]@build-host-7.eu-west-1.compute.internal";
    workers.push(cache.run(client.clone(), host.into(), 61, end));

    // Held for the whole run: a report with labels; a waiter behind it
    // that gives up after a while.
    let report = client
        .lock("reports/nightly")
        .owner("nightly-report@build-1")
        .label("job", "4711")
        .label("git", "a1b2c3d")
        .acquire()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .lock("reports/nightly")
                .owner("rerun-report@build-2")
                .wait(Duration::from_secs(seconds + 600))
                .acquire()
                .await
        }
    });

    tokio::time::sleep_until(shoot.into()).await;
    let driver = Driver::start(&chromedriver);
    let browser = Browser::open(&driver, &chromium, &dir.path().join("profile")).await;
    browser
        .post("/window/rect", json!({"width": 1440, "height": 1000}))
        .await;
    browser.goto(&format!("{}/", server.url)).await;
    browser
        .until(
            "the page, its charts and its events",
            "return document.getElementById('status').dataset.state === 'live'
                && document.getElementById('chart-hold').dataset.drawn === 'true'
                && document.querySelectorAll('#events li').length > 10
                && document.querySelectorAll('#locks tbody').length >= 5;",
            json!([]),
        )
        .await;
    let shot = browser.screenshot().await;
    std::fs::write(&out, shot).expect("write the screenshot");
    println!("wrote {}", out.display());
    for worker in workers {
        worker.abort();
    }
    waiting.abort();
    drop(report);
}
