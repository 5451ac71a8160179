//! The dashboard in a real browser: headless Chromium, driven through
//! chromedriver with plain W3C WebDriver calls ([`padlock_e2e::webdriver`]),
//! opens the page. Locks that SDK clients take appear without a reload; a
//! person types the admin token and revokes a holder; the SDK guard's
//! `lost()` fires. The page opens with the recent events, charts drawn from
//! real grants, the most contended locks, the server panel (Redis going
//! down shows), whole owners and labels, sortable columns, waiters'
//! deadlines, and no revoke buttons on a server without an admin token.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`tests/run.sh`
//! installs them). Without them the tests fail and say what to install,
//! unless they are opted out with `PADLOCK_SKIP_BROWSER=1`.
//!
//! A screenshot is kept in `tests/artifacts/dashboard.png`; the one in the
//! README comes from `cargo run --release -p padlock-e2e --bin
//! dashboard-shot` (real load for a few minutes, then a screenshot).

use padlock::{Kind, LostReason};
use padlock_e2e::http::{PATIENCE, client, json as get_json, token_file};
use padlock_e2e::webdriver::{Browser, artifact, browser, in_browser};
use padlock_e2e::{Server, own_redis, until_waiters};
use serde_json::json;
use std::time::Duration;

const TOKEN: &str = "dashboard-admin-token";

/// Is there a holder row of lock `name` (owned by `owner`)?
const HOLDER_SHOWN: &str = "return [...document.querySelectorAll('tr.holder')]
    .some(r => r.dataset.lock === arguments[0] && r.querySelector('.owner').textContent === arguments[1]);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_live_locks_and_revokes() {
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    in_browser(browser, &dir.path().join("profile"), server, drive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_a_token_when_the_server_needs_one() {
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let admin = token_file(dir.path(), TOKEN);
    let clients = dir.path().join("client-tokens");
    std::fs::write(&clients, "etl-token etl/\n").unwrap();
    let server = Server::start_with_args(&[
        "--admin-token-file",
        admin.to_str().unwrap(),
        "--client-token-file",
        clients.to_str().unwrap(),
    ]);
    in_browser(
        browser,
        &dir.path().join("profile"),
        server,
        |server, browser| async move {
            let page = format!("{}/", server.url);
            browser.goto(&page).await;
            browser
                .until(
                    "the request for a token",
                    "return document.getElementById('status').dataset.state === 'auth'
                    && !document.getElementById('auth').hidden;",
                    json!([]),
                )
                .await;
            browser.type_into("#token", "etl-token").await;
            browser
                .until(
                    "the live indicator",
                    "return document.getElementById('status').dataset.state === 'live';",
                    json!([]),
                )
                .await;
            // A lock taken after the token was given appears, live.
            let http = client();
            let response = http
                .post(format!("{}/v1/locks/etl/nightly/hold", server.url))
                .bearer_auth("etl-token")
                .header("user-agent", "etl-job/2.1")
                .send()
                .await
                .unwrap();
            let mut hold = padlock_e2e::http::Lines(padlock_e2e::http::Chunks::new(response));
            hold.expect("granted").await;
            browser
                .until(
                    "the etl holder",
                    HOLDER_SHOWN,
                    json!(["etl/nightly", "etl-job/2.1"]),
                )
                .await;
            drop(hold);
            browser
        },
    )
    .await;
}

async fn drive(server: Server, browser: Browser) -> Browser {
    let sdk = server.client().await;
    let page = format!("{}/", server.url);
    browser.goto(&page).await;
    browser
        .until(
            "the live indicator",
            "return document.getElementById('status').dataset.state === 'live';",
            json!([]),
        )
        .await;
    // A reload would lose this mark.
    browser
        .script("window.padlockTestMark = 'same page';", json!([]))
        .await;

    // Locks taken after the page loaded, by SDK clients and by curl-like
    // HTTP holders.
    let nightly = sdk
        .lock("reports/nightly")
        .owner("nightly-report@build-1")
        .label("job", "4711")
        .acquire()
        .await
        .unwrap();
    let deploy = sdk
        .lock("deploy/prod")
        .owner("deploy@ci-runner-3")
        .acquire()
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for owner in ["deploy@ci-runner-7", "deploy@ci-runner-9"] {
        let sdk = sdk.clone();
        waiters.push(tokio::spawn(async move {
            sdk.lock("deploy/prod").owner(owner).acquire().await
        }));
    }
    let mut gpus = Vec::new();
    for owner in ["train-resnet@gpu-box", "train-bert@gpu-box"] {
        gpus.push(
            sdk.lock("gpu")
                .semaphore(4)
                .owner(owner)
                .acquire()
                .await
                .unwrap(),
        );
    }
    let mut readers = Vec::new();
    for owner in ["reporting@db-2", "backup@db-3"] {
        readers.push(
            sdk.lock("db/schema")
                .shared()
                .owner(owner)
                .acquire()
                .await
                .unwrap(),
        );
    }
    let curl = client();
    let hold = curl
        .post(format!("{}/v1/locks/cron/cleanup/hold", server.url))
        .header("user-agent", "curl/7.88.1")
        .send()
        .await
        .unwrap();
    assert!(hold.status().is_success());

    // They appear without a reload.
    browser
        .until(
            "the SDK holder of reports/nightly",
            HOLDER_SHOWN,
            json!(["reports/nightly", "nightly-report@build-1"]),
        )
        .await;
    browser
        .until(
            "two waiters on deploy/prod, two gpu slots, two readers and the curl holder",
            "const rows = (sel, lock) => [...document.querySelectorAll(sel)].filter(r => r.dataset.lock === lock).length;
             return rows('tr.waiter', 'deploy/prod') === 2 && rows('tr.holder', 'gpu') === 2
                 && rows('tr.holder', 'db/schema') === 2 && rows('tr.holder', 'cron/cleanup') === 1;",
            json!([]),
        )
        .await;
    let mark = browser
        .script("return window.padlockTestMark;", json!([]))
        .await;
    assert_eq!(mark, "same page", "the page reloaded");
    // The fence and the owner are on the page as the server has them.
    let fence = browser
        .script(
            "const row = [...document.querySelectorAll('tr.holder')].find(r => r.dataset.lock === arguments[0]);
             return row.querySelector('.fence').textContent;",
            json!(["reports/nightly"]),
        )
        .await;
    assert_eq!(fence, nightly.fence().to_string());
    // Ages tick.
    browser
        .until(
            "an age of at least 1s",
            "return [...document.querySelectorAll('td.age')].some(td => td.textContent !== '0s');",
            json!([]),
        )
        .await;

    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    std::fs::write(artifact("dashboard.png"), &shot).unwrap();

    // The filter narrows the table to matching names.
    browser.type_into("#filter", "nightly").await;
    browser
        .until(
            "only reports/nightly after filtering",
            "const shown = [...document.querySelectorAll('#locks tbody')].map(b => b.dataset.lock);
             return shown.length === 1 && shown[0] === 'reports/nightly';",
            json!([]),
        )
        .await;

    let row = format!(
        "tr.holder[data-holder-id=\"{}\"] button.revoke",
        nightly.holder_id()
    );
    // A wrong token is refused, and the page says so; the lock stays.
    browser.type_into("#token", "not-the-token").await;
    browser.click(&row).await;
    browser.click(&format!("{row}.confirm")).await;
    browser
        .until(
            "the refusal",
            "return [...document.querySelectorAll('.toast')].some(t => t.textContent.includes('wrong admin token'));",
            json!([]),
        )
        .await;
    assert!(nightly.is_held());

    // The right token revokes: the SDK holder is told, the row goes.
    browser.type_into("#token", TOKEN).await;
    browser.click(&row).await;
    browser.click(&format!("{row}.confirm")).await;
    let lost = tokio::time::timeout(PATIENCE, nightly.lost())
        .await
        .expect("lost() did not fire after the revoke");
    assert_eq!(lost.reason, LostReason::Revoked);
    browser
        .until(
            "the revoked holder gone",
            "return !document.querySelector('tr.holder[data-lock=\"reports/nightly\"]');",
            json!([]),
        )
        .await;

    drop((deploy, gpus, readers, hold, waiters));
    browser
}

/// The page's text for `css` (the first match), or null.
const TEXT_OF: &str =
    "const n = document.querySelector(arguments[0]); return n ? n.textContent : null;";

/// Before the page opens: grants (one lock waited for), a long owner with
/// labels, a waiter with a deadline. The page opens with those events, a
/// grants chart that counts them, the contended lock first, the server
/// panel, whole owners, visible labels, sortable columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_opens_with_history_charts_and_the_server() {
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), TOKEN);
    let server = Server::start_with_args(&["--admin-token-file", token.to_str().unwrap()]);
    in_browser(browser, &dir.path().join("profile"), server, history_steps).await;
}

async fn history_steps(server: Server, browser: Browser) -> Browser {
    let sdk = server.client().await;
    // Ten quick grants, and one lock that a second client waits for.
    for _ in 0..10 {
        let guard = sdk.lock("before/page").acquire().await.unwrap();
        guard.release().await.unwrap();
    }
    let holder = sdk.lock("contended/job").acquire().await.unwrap();
    let waiter = tokio::spawn({
        let sdk = sdk.clone();
        async move { sdk.lock("contended/job").acquire().await }
    });
    until_waiters(&sdk, "contended/job", Kind::File, 1).await;
    holder.release().await.unwrap();
    let second = waiter.await.unwrap().unwrap();
    second.release().await.unwrap();
    let grants = 12;

    // Held while the page is open: an old lock, a long owner with labels,
    // a newer lock, and a waiter that gives up in a minute.
    let oldest = sdk.lock("zz/oldest").acquire().await.unwrap();
    let owner = "padlock[9189]@build-host-7.eu-west-1.compute.internal";
    let long = sdk
        .lock("aa/newest")
        .owner(owner)
        .label("job", "4711")
        .label("team", "payments")
        .acquire()
        .await
        .unwrap();
    let patient = tokio::spawn({
        let sdk = sdk.clone();
        async move {
            sdk.lock("aa/newest")
                .owner("patient")
                .wait(Duration::from_secs(60))
                .acquire()
                .await
        }
    });
    until_waiters(&sdk, "aa/newest", Kind::File, 1).await;

    browser.goto(&format!("{}/", server.url)).await;
    browser
        .until(
            "the live indicator",
            "return document.getElementById('status').dataset.state === 'live';",
            json!([]),
        )
        .await;

    // History: the events from before the page opened are in the feed.
    browser
        .until(
            "the events from before the page opened",
            "const names = [...document.querySelectorAll('#events .ev-name')].map(n => n.textContent);
             return names.includes('before/page') && names.includes('contended/job');",
            json!([]),
        )
        .await;

    // The grants chart counts the grants, from the server's own series;
    // more grants move it, without a reload.
    let chart_sum = "const p = document.querySelector('#chart-grants path.series');
                     return p !== null && Number(p.dataset.sum) === arguments[0];";
    browser
        .until(
            "the grants chart counting 14 grants",
            chart_sum,
            json!([grants + 2]),
        )
        .await;
    for _ in 0..3 {
        let guard = sdk.lock("during/page").acquire().await.unwrap();
        guard.release().await.unwrap();
    }
    browser
        .until(
            "the grants chart counting 17 grants",
            chart_sum,
            json!([grants + 5]),
        )
        .await;
    browser
        .until(
            "both series of holders and waiters drawn",
            "const p = [...document.querySelectorAll('#chart-load path.series')];
             return p.length === 2 && p.every(s => Number(s.dataset.points) > 0)
                 && Number(p[1].dataset.sum) > 0;",
            json!([]),
        )
        .await;
    browser
        .until(
            "wait percentiles",
            "const t = document.getElementById('wait-percentiles').textContent;
             return t.startsWith('p50 ') && t.includes(' grants');",
            json!([]),
        )
        .await;

    // The contended locks: the one waited for (peak queue 1) and the one
    // waited for now; not the one always free.
    browser
        .until(
            "contended/job and aa/newest in the contention table, before/page not",
            "const rows = [...document.querySelectorAll('#contended tbody tr')];
             const row = (name) => rows.find(r => r.dataset.lock === name);
             return row('contended/job') !== undefined && row('aa/newest') !== undefined
                 && row('before/page') === undefined
                 && row('contended/job').cells[2].textContent === '1'
                 && row('aa/newest').cells[3].textContent === '1';",
            json!([]),
        )
        .await;

    // The server panel says what /v1/server says.
    let (_, facts) = get_json(client().get(format!("{}/v1/server", server.url))).await;
    browser
        .until(
            "the server panel",
            "return document.getElementById('version').textContent === arguments[0]
                && document.getElementById('lock-dir').textContent === arguments[1]
                && document.getElementById('ready').dataset.ready === 'true'
                && document.querySelector('[data-kind-state=\"file\"]').dataset.serving === 'true'
                && document.getElementById('revoke').dataset.enabled === 'true';",
            json!([facts["version"], facts["lock_dir"]]),
        )
        .await;

    // The whole owner is on the page, inside its cell; labels are shown.
    let owner_shown = browser
        .script(
            "const row = document.querySelector('tr.holder[data-lock=\"aa/newest\"]');
             const cell = row.querySelector('.owner-cell');
             const name = cell.querySelector('.owner');
             const inside = name.getBoundingClientRect().right <= cell.getBoundingClientRect().right + 0.5;
             const chips = [...cell.querySelectorAll('.label-chip')]
                 .filter(c => c.offsetWidth > 0).map(c => c.textContent);
             return [name.textContent, inside && cell.scrollWidth <= cell.clientWidth, chips];",
            json!([]),
        )
        .await;
    assert_eq!(
        owner_shown,
        json!([owner, true, ["job=4711", "team=payments"]])
    );
    // Ids and fences are not cut off either.
    let cut = browser
        .script(
            "return [...document.querySelectorAll('#locks td.id, #locks td.fence')]
                 .filter(c => c.scrollWidth > c.clientWidth).map(c => c.textContent);",
            json!([]),
        )
        .await;
    assert_eq!(cut, json!([]), "cells cut off");

    // The waiter's deadline counts down; a holder has none.
    browser
        .until(
            "the waiter's deadline",
            "const cell = document.querySelector('tr.waiter[data-lock=\"aa/newest\"] .deadline');
             const s = cell && parseInt(cell.textContent, 10);
             return cell !== null && cell.dataset.until !== undefined && /^[0-9]+s$/.test(cell.textContent)
                 && s > 0 && s <= 60;",
            json!([]),
        )
        .await;

    // Sorting: by name first (aa before zz), by age (oldest first) on a click.
    let order =
        "const names = [...document.querySelectorAll('#locks tbody')].map(b => b.dataset.lock);
                 return names.indexOf('aa/newest') >= 0 && names.indexOf('zz/oldest') >= 0
                     && (names.indexOf(arguments[0]) < names.indexOf(arguments[1]));";
    browser
        .until(
            "aa/newest before zz/oldest",
            order,
            json!(["aa/newest", "zz/oldest"]),
        )
        .await;
    browser.click("button.sort[data-sort=\"age\"]").await;
    browser
        .until(
            "zz/oldest first by age",
            order,
            json!(["zz/oldest", "aa/newest"]),
        )
        .await;
    let sorted = browser
        .script(TEXT_OF, json!(["th[aria-sort] button.sort"]))
        .await;
    assert_eq!(sorted, "Age");
    browser.click("button.sort[data-sort=\"name\"]").await;
    browser
        .until("back by name", order, json!(["aa/newest", "zz/oldest"]))
        .await;

    drop((oldest, long, patient));
    browser
}

/// Without an admin token there is nothing to revoke with: no buttons, no
/// token box. Redis going down shows in the server panel, and coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_redis_health_and_no_revoke_without_an_admin_token() {
    let Some(redis) = own_redis() else {
        return;
    };
    let Some(browser) = browser() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::on_redis(&redis);
    let redis = std::sync::Arc::new(std::sync::Mutex::new(redis));
    in_browser(
        browser,
        &dir.path().join("profile"),
        server,
        move |server, browser| async move {
            let sdk = server.client().await;
            let guard = sdk.lock("plain").owner("someone").acquire().await.unwrap();
            browser.goto(&format!("{}/", server.url)).await;
            browser
                .until("the holder row", HOLDER_SHOWN, json!(["plain", "someone"]))
                .await;
            browser
                .until(
                    "revoke marked off",
                    "return document.getElementById('revoke').dataset.enabled === 'false';",
                    json!([]),
                )
                .await;
            let controls = browser
                .script(
                    "return [document.querySelectorAll('button.revoke').length,
                             document.getElementById('token-field').hidden];",
                    json!([]),
                )
                .await;
            assert_eq!(
                controls,
                json!([0, true]),
                "revoke controls without an admin token"
            );

            let kind_state = "const k = document.querySelector('[data-kind-state=\"redis\"]');
                 return k !== null && k.dataset.serving === arguments[0]
                     && document.getElementById('ready').dataset.ready === arguments[0];";
            browser
                .until("redis serving", kind_state, json!(["true"]))
                .await;
            redis.lock().unwrap().kill9();
            browser
                .until("redis shown down", kind_state, json!(["false"]))
                .await;
            let ready = browser.script(TEXT_OF, json!(["#ready"])).await;
            assert_eq!(ready, "not ready: redis down");
            redis.lock().unwrap().restart();
            browser
                .until("redis serving again", kind_state, json!(["true"]))
                .await;
            drop(guard);
            browser
        },
    )
    .await;
}
