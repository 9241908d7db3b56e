//! Issue 17 acceptance: FastCGI pools (`protocol = "fastcgi"`) of Debian's
//! php-cgi, one sandboxed unit per worker behind nginx's fastcgi_pass: our
//! PHP scripts (vm-tests/fixtures/php), a real PHP application from Debian's
//! archive (DokuWiki), and zero failed requests while a PHP pool scales,
//! rolls, recycles by max_requests and loses a worker to kill -9.
use super::common::{apply, assert_pool_running, header, install, request, write_config, CONFIG};
use super::edge::{parse_wrk, Load};
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("fastcgi_php_scripts", php_scripts),
        s("fastcgi_php_timeout_and_errors", php_timeout_and_errors),
        s(
            "fastcgi_php_zero_failures_under_load",
            php_zero_failures_under_load,
        ),
        s("fastcgi_php_health_probe", php_health_probe),
        s("fastcgi_dokuwiki", dokuwiki),
    ]
}

/// Where the fixture scripts live in the guest (the pools' document root).
const DOCROOT: &str = "/srv/php";

/// The fixture scripts in /srv/php, readable by nginx (www-data) and by the
/// workers' dynamic user.
pub(super) fn install_php(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.succeed(&format!(
        "set -e; rm -rf {DOCROOT}; cp -r /payload/fixtures/php {DOCROOT}; \
         chown -R root:root {DOCROOT}; chmod -R u=rwX,go=rX {DOCROOT}"
    ))?;
    Ok(())
}

pub(super) fn php_pool(name: &str, route: &str, extra: &str) -> String {
    format!(
        "[pool.{name}]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/php-cgi\"\nroute = \"{route}\"\n\
         document_root = \"{DOCROOT}\"\n{extra}\n"
    )
}

/// `cgipool apply`, then wait until nginx routes `url` to a PHP worker.
pub(super) fn apply_and_route(m: &mut Machine, url: &str) -> Result<()> {
    apply(m)?;
    m.wait_until_succeeds(
        &format!("curl -sf '{url}' | grep -q 'hello from'"),
        &format!("nginx to route {url} to php-cgi"),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// GET, PATH_INFO, a POST form, a file upload, sessions shared by the
/// pool's workers, static files from nginx (and the guard that never runs
/// an uploaded file), a 50 MiB streamed response, PCRE in the sandbox.
fn php_scripts(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    // A second pool on a route with a dot segment (/.well-known): the
    // dotfile rule applies below a route, never to the route itself.
    write_config(
        m,
        &format!(
            "{}{}",
            php_pool("php", "/php", "min = 2\nbody_limit = \"8m\""),
            php_pool("wk", "/.well-known", "min = 1\nmax = 1")
        ),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    assert_pool_running(m, "php", 2)?;
    let unit = m.succeed("cat /etc/systemd/system/cgipool-php@.service")?;
    for want in [
        "StandardInput=socket",
        "Environment=PHP_FCGI_CHILDREN=0 PHP_FCGI_MAX_REQUESTS=0",
        "MemoryDenyWriteExecute=yes",
        "User=cgipool-php",
    ] {
        ensure!(
            unit.lines().any(|l| l == want),
            "the unit lacks {want}:\n{unit}"
        );
    }

    // GET: the directory index, PATH_INFO, X-Request-ID, no httpoxy.
    let (code, headers, body) = request(
        m,
        "-H 'Proxy: http://evil:3128' 'http://127.0.0.1/php/info.php/extra/path?a=1'",
    )?;
    ensure!(code == 200, "info.php answered {code}: {body}");
    let id = header(&headers, "X-Request-ID").context("no X-Request-ID")?;
    for want in [
        "REQUEST_METHOD=GET".to_string(),
        "SCRIPT_NAME=/php/info.php".to_string(),
        format!("SCRIPT_FILENAME={DOCROOT}/info.php"),
        "PATH_INFO=/extra/path".to_string(),
        "QUERY_STRING=a=1".to_string(),
        format!("HTTP_X_REQUEST_ID={id}"),
        "HTTP_PROXY=\n".to_string(),
        "children=0 max_requests=0".to_string(),
    ] {
        ensure!(body.contains(&want), "info.php lacks {want:?}:\n{body}");
    }
    ensure!(
        header(&headers, "X-Cgipool-Worker").is_some_and(|w| w.starts_with("php@")),
        "no X-Cgipool-Worker:\n{headers}"
    );
    let (code, _, body) = request(m, "http://127.0.0.1/php/")?;
    ensure!(
        code == 200 && body.starts_with("index of php"),
        "the index answered {code}: {body}"
    );
    let (code, headers, _) = request(m, "http://127.0.0.1/php")?;
    ensure!(
        code == 301 && header(&headers, "Location").is_some_and(|l| l.ends_with("/php/")),
        "/php answered {code}:\n{headers}"
    );

    // POST form.
    let (code, _, body) = request(
        m,
        "-d 'name=John+Doe&lang=php' http://127.0.0.1/php/form.php",
    )?;
    ensure!(
        code == 200 && body.contains("name=John Doe\nlang=php"),
        "POST form answered {code}: {body}"
    );

    // Upload: 3 MiB, spooled into the worker's RuntimeDirectory.
    m.succeed("head -c 3145728 /dev/urandom > /tmp/up.bin")?;
    let sum = m.succeed("sha256sum /tmp/up.bin | cut -d' ' -f1")?;
    let (code, _, body) = request(m, "-F 'file=@/tmp/up.bin' http://127.0.0.1/php/upload.php")?;
    ensure!(code == 200, "upload answered {code}: {body}");
    ensure!(
        body.contains("size=3145728") && body.contains(&format!("sha256={}", sum.trim())),
        "the upload arrived damaged:\n{body}"
    );
    ensure!(
        body.contains("tmp_dir=/run/cgipool-php/"),
        "the upload was not spooled in the worker's RuntimeDirectory:\n{body}"
    );
    // body_limit: nginx refuses a larger body before PHP sees it.
    m.succeed("head -c 9437184 /dev/zero > /tmp/big.bin")?;
    let (code, _, _) = request(m, "-F 'file=@/tmp/big.bin' http://127.0.0.1/php/upload.php")?;
    ensure!(code == 413, "a body over body_limit answered {code}");

    // Sessions: one cookie, counted across both workers.
    let mut workers = std::collections::BTreeSet::new();
    for n in 1..=6 {
        let (code, _, body) = request(
            m,
            "-b /tmp/jar -c /tmp/jar http://127.0.0.1/php/session.php",
        )?;
        ensure!(
            code == 200 && body.contains(&format!("n={n}\n")),
            "session request {n} answered {code}: {body}"
        );
        ensure!(
            body.contains("save_path=/var/lib/cgipool-php/sessions"),
            "{body}"
        );
        if let Some(w) = body.lines().find_map(|l| l.strip_prefix("worker=")) {
            workers.insert(w.to_string());
        }
    }
    ensure!(
        workers.len() == 2,
        "the session requests did not reach both workers ({workers:?}): sharing is not shown"
    );

    // Static files come from nginx (its ETag), never from PHP; an uploaded
    // file is never run as PHP; dotfiles are hidden.
    let (code, headers, body) = request(m, "http://127.0.0.1/php/static/style.css")?;
    ensure!(
        code == 200 && body.contains("color") && header(&headers, "ETag").is_some(),
        "the stylesheet answered {code} (not nginx's static file?):\n{headers}"
    );
    let (code, _, _) = request(m, "http://127.0.0.1/php/static/upload.jpg/x.php")?;
    ensure!(
        code == 404,
        "upload.jpg/x.php answered {code}: the guard failed"
    );
    let (code, _, _) = request(m, "http://127.0.0.1/php/missing.php")?;
    ensure!(code == 404, "a missing script answered {code}");
    m.succeed(&format!("echo secret > {DOCROOT}/.env"))?;
    m.succeed(&format!("echo secret > {DOCROOT}/static/.env"))?;
    for url in [
        "http://127.0.0.1/php/.env",
        "http://127.0.0.1/php/static/.env",
        "http://127.0.0.1/.well-known/.env",
        "http://127.0.0.1/.well-known/static/.env",
    ] {
        let (code, _, _) = request(m, url)?;
        ensure!(code == 404, "the dotfile {url} answered {code}");
    }
    let (code, _, body) = request(m, "http://127.0.0.1/.well-known/static/style.css")?;
    ensure!(
        code == 200 && body.contains("color"),
        "a static file under /.well-known answered {code}: {body}"
    );
    let (code, _, body) = request(m, "http://127.0.0.1/.well-known/hello.php")?;
    ensure!(
        code == 200 && body.contains("hello from"),
        "a script under /.well-known answered {code}: {body}"
    );

    // 50 MiB streamed; the worker's peak memory stays far below it.
    let out = m.succeed(
        "curl -sS -o /dev/null -w '%{http_code} %{size_download}' http://127.0.0.1/php/big.php",
    )?;
    ensure!(out.trim() == "200 52428800", "big.php: {out}");
    let journal = m.wait_until_succeeds(
        "journalctl -q -o cat -t cgipool-php | grep 'big.php peak_memory='",
        "big.php's log line",
        Duration::from_secs(10),
    )?;
    let peak: u64 = journal
        .trim()
        .rsplit('=')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no peak memory in {journal:?}"))?;
    ensure!(
        peak < 16 << 20,
        "big.php peaked at {peak} bytes: the response was held"
    );

    // PCRE in the sandbox: matches, and nothing complains.
    let (code, _, body) = request(m, "http://127.0.0.1/php/pcre.php")?;
    ensure!(
        code == 200 && body.starts_with("match=1 id=12345 error=No error jit=0"),
        "pcre.php answered {code}: {body}"
    );
    let journal = m.succeed("journalctl -q -o cat -t cgipool-php")?;
    ensure!(
        !journal.contains("JIT") && !journal.contains("Warning"),
        "PHP complained in the journal:\n{journal}"
    );
    println!("fastcgi: pcre.php: {}", body.trim());
    let score = m.succeed("systemd-analyze security --no-pager cgipool-php@1.service | tail -1")?;
    println!("fastcgi: php worker: {}", score.trim());
    Ok(())
}

/// A fatal error is a 500; a script past request_timeout gets nginx's 504,
/// and PHP's max_execution_time stops it so the worker serves again.
fn php_timeout_and_errors(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    write_config(
        m,
        &php_pool("php", "/php", "min = 1\nmax = 1\nrequest_timeout = \"2s\""),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    let unit = "cgipool-php@1.service";
    let pid = m.unit_property(unit, "MainPID")?;

    let (code, _, body) = request(m, "http://127.0.0.1/php/fatal.php")?;
    ensure!(code == 500, "fatal.php answered {code}: {body}");
    m.wait_until_succeeds(
        "journalctl -q -o cat -t cgipool-php | grep -q 'Call to undefined function this_function_does_not_exist'",
        "the fatal error in the journal",
        Duration::from_secs(10),
    )?;

    let t = Instant::now();
    let (code, _, body) = request(m, "http://127.0.0.1/php/spin.php")?;
    let took = t.elapsed().as_secs_f64();
    ensure!(code == 504, "spin.php answered {code}: {body}");
    let most = m.scaled(Duration::from_secs(8)).as_secs_f64();
    ensure!(
        (1.5..most).contains(&took),
        "504 after {took:.1}s, expected about 2s (at most {most:.1}s, scaled)"
    );
    // PHP stops the script (max_execution_time = 2 s of CPU time), or, when
    // the busy machine gives the script its 2 s of CPU only later, watch's
    // reaper kills the worker still holding the connection nginx closed
    // (fastcgi_php_sleep_past_timeout); either way the pool serves again.
    let stopped = m.wait_until_succeeds(
        "journalctl -q -o cat -t cgipool-php | grep -q 'Maximum execution time of 2 seconds exceeded' && echo php || \
         (journalctl -q -o cat -u cgipool-watch.service | grep -q 'cgipool-php@1.service (pool php): killed' && echo reaper)",
        "PHP to stop the runaway script (or watch to kill its worker)",
        Duration::from_secs(15),
    )?;
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/php/hello.php | grep -q 'hello from php@1'",
        "the pool to serve after the timeout",
        Duration::from_secs(10),
    )?;
    let same = m.unit_property(unit, "MainPID")? == pid;
    ensure!(
        same || stopped.trim() == "reaper",
        "the worker was restarted, but neither by PHP's limit nor by watch ({stopped})"
    );
    println!(
        "fastcgi: spin.php answered 504 after {took:.2}s; stopped by {}, the worker serves on",
        stopped.trim()
    );
    Ok(())
}

/// Under load a PHP pool scales up and down, rolls (environment change),
/// recycles its workers after max_requests and loses one to kill -9,
/// without a failed request.
fn php_zero_failures_under_load(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    let config = |round: &str| {
        php_pool(
            "php",
            "/php",
            &format!(
                "min = 2\nmax = 4\nmax_requests = 5000\nenvironment = {{ ROUND = \"{round}\" }}"
            ),
        )
    };
    write_config(m, &config("1"))?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    assert_pool_running(m, "php", 2)?;
    let mut load = Load::start(m, 8, 30, "http://127.0.0.1:80/php/hello.php")?;
    // The pauses space the changes out over the load; nothing waits on them.
    std::thread::sleep(Duration::from_secs(2));
    load.step(
        m,
        "kill -9 php@1",
        &crate::machine::kill_main_pid("cgipool-php@1.service"),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    load.step(m, "scale 2 -> 4", "cgipool scale php 4")?;
    std::thread::sleep(Duration::from_secs(2));
    load.step(m, "scale 4 -> 2", "cgipool scale php 2")?;
    write_config(m, &config("2"))?;
    load.step(
        m,
        "rolling restart (environment changed)",
        &format!("cgipool apply {CONFIG}"),
    )?;
    let report = load.finish(m, "php zero-failure load", 2_000)?;
    // php@2 was never killed: systemd's automatic restarts of it (a roll
    // is a restart job, not one of these) are recycles after max_requests.
    let journal = m.journal("cgipool-php@2.service")?;
    let recycles = journal.matches("Scheduled restart job").count();
    ensure!(
        recycles >= 1,
        "php@2 never recycled after max_requests = 5000 ({} requests in all):\n{journal}",
        report.requests
    );
    // Recycling never ran into systemd's start limit.
    ensure!(
        !journal.contains("Start request repeated too quickly"),
        "php@2 hit its start limit while recycling:\n{journal}"
    );
    m.wait_until_succeeds(
        "systemctl is-active -q cgipool-php@2.service",
        "php@2 to be active after its recycles",
        Duration::from_secs(10),
    )?;
    println!(
        "fastcgi: {} requests, php@2 recycled {recycles} times",
        report.requests
    );

    // Keep-alive clients (no nginx reload in this phase, see edge::Load):
    // a worker killed mid-request and the recycles cost no request either.
    let timeout = m.scaled(Duration::from_secs(10)).as_secs().max(10);
    m.succeed(&format!(
        "systemd-run --quiet --collect --unit=vmtest-wrk-ka -p StandardOutput=truncate:/tmp/wrk-ka.out \
         wrk -t2 -c8 -d12s --timeout {timeout}s http://127.0.0.1:80/php/hello.php"
    ))?;
    m.wait_until_succeeds(
        "pgrep -x wrk",
        "wrk (keep-alive) to start",
        Duration::from_secs(5),
    )?;
    for n in [1, 2] {
        std::thread::sleep(Duration::from_secs(3));
        m.succeed(&crate::machine::kill_main_pid(&format!(
            "cgipool-php@{n}.service"
        )))?;
    }
    let out = m.wait_until_succeeds(
        "grep -q 'requests in' /tmp/wrk-ka.out && cat /tmp/wrk-ka.out",
        "wrk (keep-alive) to finish",
        Duration::from_secs(45),
    )?;
    let ka = parse_wrk(&out)?;
    ensure!(
        ka.non_2xx == 0 && ka.socket_errors == 0 && ka.requests >= 1_000,
        "keep-alive clients: {} non-2xx and {} socket errors in {} requests:\n{}",
        ka.non_2xx,
        ka.socket_errors,
        ka.requests,
        ka.text
    );
    println!(
        "fastcgi: keep-alive clients: {} requests, two workers killed, none failed",
        ka.requests
    );
    Ok(())
}

/// watch probes php-cgi workers over FastCGI: a healthy script passes, a
/// 503 three times in a row takes the worker out and restarts it, and it
/// comes back once the script answers 200 again.
fn php_health_probe(m: &mut Machine) -> Result<()> {
    install_php(m)?;
    write_config(
        m,
        &php_pool(
            "php",
            "/php",
            // Per-worker sockets: the probe reaches each worker and takes
            // the sick one out of nginx (a shared queue's probe:
            // fastcgi_php_shared_probe_names_the_worker).
            "min = 2\nqueue = \"per-worker\"\nhealth_path = \"/health.php\"\nhealth_interval = \"1s\"\nunhealthy_after = 3",
        ),
    )?;
    apply_and_route(m, "http://127.0.0.1/php/hello.php")?;
    // Three probe rounds reach each worker (each call leaves a line in the
    // worker's journal) and pass: no failure is logged.
    m.wait_until_succeeds(
        "for n in 1 2; do test $(journalctl -u cgipool-php@$n.service -o cat | grep -c 'health.php called') -ge 3 || exit 1; done",
        "three probes to reach each worker",
        Duration::from_secs(20),
    )?;
    let journal = m.journal("cgipool-watch.service")?;
    ensure!(
        !journal.contains("probe /health.php failed"),
        "the probe failed on a healthy worker:\n{journal}"
    );
    let pid = m.unit_property("cgipool-php@1.service", "MainPID")?;
    m.succeed("touch /srv/php-sick")?;
    m.wait_until_succeeds(
        "journalctl -u cgipool-watch -o cat | grep -q 'cgipool-php@1.service: unhealthy; taking it out of nginx and restarting it'",
        "watch to restart the sick worker",
        Duration::from_secs(20),
    )?;
    let journal = m.journal("cgipool-watch.service")?;
    ensure!(
        journal.contains("probe /health.php failed (3/3): answered 503"),
        "the probe's reason is not logged:\n{journal}"
    );
    m.succeed("rm /srv/php-sick")?;
    m.wait_until_succeeds(
        "journalctl -u cgipool-watch -o cat | grep -q 'cgipool-php@1.service: probe /health.php passed again; back into nginx'",
        "the worker to come back",
        Duration::from_secs(20),
    )?;
    ensure!(
        m.unit_property("cgipool-php@1.service", "MainPID")? != pid,
        "the sick worker was not restarted"
    );
    // Both workers were sick; watch routes them again once they pass.
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/php/health.php | grep -q '^ok from php@'",
        "nginx to route the recovered pool",
        Duration::from_secs(20),
    )?;
    Ok(())
}

/// DokuWiki from Debian's archive, served by nginx (static files) and a
/// php-cgi pool running as www-data: its pages render, a page edited
/// through its form (session + CSRF token) shows the new text, and its
/// stylesheets and images come from nginx.
fn dokuwiki(m: &mut Machine) -> Result<()> {
    install(m)?;
    // Open the wiki for anonymous edits (Debian's default lets @ALL read).
    m.succeed("sed -i \"s/\\$conf\\['useacl'\\] = 1;/\\$conf['useacl'] = 0;/\" /etc/dokuwiki/local.php && grep -q \"useacl'\\] = 0\" /etc/dokuwiki/local.php")?;
    write_config(
        m,
        "[pool.wiki]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/php-cgi\"\nroute = \"/dokuwiki\"\n\
         document_root = \"/usr/share/dokuwiki\"\nindex = \"doku.php\"\nuser = \"www-data\"\n\
         read_write_paths = [\"/var/lib/dokuwiki\"]\nmin = 2\n",
    )?;
    apply(m)?;
    m.wait_until_succeeds(
        "curl -sf http://127.0.0.1/dokuwiki/doku.php | grep -q 'DokuWiki'",
        "DokuWiki's start page",
        Duration::from_secs(10),
    )?;
    let (code, _, body) = request(m, "-L http://127.0.0.1/dokuwiki/")?;
    ensure!(
        code == 200 && body.contains("<html") && body.contains("Debian DokuWiki"),
        "the start page answered {code}:\n{body}"
    );

    // Edit a page through its form: GET the editor (session cookie and the
    // form's security token), POST the text, read the page.
    let (code, _, form) = request(
        m,
        "-c /tmp/wjar -b /tmp/wjar 'http://127.0.0.1/dokuwiki/doku.php?id=cgipool&do=edit'",
    )?;
    ensure!(code == 200, "the editor answered {code}");
    let sectok = form
        .split("name=\"sectok\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .with_context(|| format!("no sectok in the edit form:\n{form}"))?
        .to_string();
    let (code, _, body) = request(
        m,
        &format!(
            "-c /tmp/wjar -b /tmp/wjar --data-urlencode 'wikitext=Served by a cgipool FastCGI pool.' \
             -d 'sectok={sectok}&id=cgipool&do[save]=Save&summary=test' -L http://127.0.0.1/dokuwiki/doku.php"
        ),
    )?;
    ensure!(code == 200, "saving answered {code}:\n{body}");
    let (code, _, page) = request(m, "'http://127.0.0.1/dokuwiki/doku.php?id=cgipool'")?;
    ensure!(
        code == 200 && page.contains("Served by a cgipool FastCGI pool."),
        "the saved page does not show the text ({code}):\n{page}"
    );
    m.succeed("test -f /var/lib/dokuwiki/data/pages/cgipool.txt")?;

    // Static assets: served by nginx (ETag, Last-Modified), not PHP.
    for asset in [
        "/dokuwiki/lib/tpl/dokuwiki/images/logo.png",
        "/dokuwiki/lib/images/license/button/cc-by-sa.png",
    ] {
        let (code, headers, _) = request(m, &format!("http://127.0.0.1{asset}"))?;
        ensure!(
            code == 200
                && header(&headers, "ETag").is_some()
                && header(&headers, "X-Powered-By").is_none(),
            "{asset} answered {code} (not a static file from nginx?):\n{headers}"
        );
    }
    // Its own PHP-generated stylesheet goes through the pool.
    let (code, _, css) = request(m, "'http://127.0.0.1/dokuwiki/lib/exe/css.php?t=dokuwiki'")?;
    ensure!(code == 200 && css.contains('{'), "css.php answered {code}");
    let score =
        m.succeed("systemd-analyze security --no-pager cgipool-wiki@1.service | tail -1")?;
    println!("fastcgi: DokuWiki worker (user www-data): {}", score.trim());
    let journal = m.succeed("journalctl -q -o cat -t cgipool-wiki")?;
    ensure!(
        !journal.contains("PHP Fatal") && !journal.contains("PHP Warning"),
        "DokuWiki complained:\n{journal}"
    );
    Ok(())
}
