//! Issue 9 acceptance: classic CGI programs in pools (`protocol = "cgi"`),
//! with unmodified programs no one on the team wrote (Debian's
//! git-http-backend and gitweb.cgi) and the shell scripts in examples/cgi/.
use super::common::{apply, assert_pool_running, header, install, request, write_config, CONFIG};
use super::edge::Load;
use crate::machine::Machine;
use crate::Scenario;
use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};

pub fn scenarios() -> Vec<Scenario> {
    let s = Scenario::nspawn;
    vec![
        s("cgi_shell_script", shell_script),
        s("cgi_timeout_and_garbage", timeout_and_garbage),
        s("cgi_zero_failures_under_load", zero_failures_under_load),
        s("cgi_git_http_backend", git_http_backend),
        s("cgi_gitweb", gitweb),
    ]
}

/// Where the example CGI programs are installed in the guest.
const CGI_DIR: &str = "/usr/local/lib/cgipool/cgi";

fn install_cgi(m: &mut Machine) -> Result<()> {
    install(m)?;
    m.succeed(&format!(
        "install -d {CGI_DIR} && install -m 0755 /payload/examples/cgi/*.cgi {CGI_DIR}/"
    ))?;
    Ok(())
}

/// `cgipool apply`, then wait until nginx routes `path` to the pool: right
/// after a reload an old nginx worker may still accept a connection and
/// answer with the previous configuration.
fn apply_and_route(m: &mut Machine, path: &str) -> Result<()> {
    apply(m)?;
    m.wait_until_succeeds(
        &format!(
            "curl -s -o /dev/null -D - 'http://127.0.0.1{path}' | grep -qi '^X-Cgipool-Worker:'"
        ),
        &format!("nginx to route {path} to the gateway"),
        Duration::from_secs(10),
    )?;
    Ok(())
}

/// VmHWM (peak resident set) of a process, in KiB.
fn vm_hwm_kib(m: &mut Machine, pid: &str) -> Result<u64> {
    let out = m.succeed(&format!("awk '/^VmHWM:/ {{print $2}}' /proc/{pid}/status"))?;
    out.trim()
        .parse()
        .with_context(|| format!("no VmHWM for pid {pid}: {out:?}"))
}

/// The processes in a unit's cgroup.
fn cgroup_procs(m: &mut Machine, unit: &str) -> Result<Vec<String>> {
    let cg = m.unit_property(unit, "ControlGroup")?;
    let out = m.succeed(&format!(
        "cat '/sys/fs/cgroup{cg}/cgroup.procs' | xargs -r -n1 sh -c 'echo \"$0 $(tr \"\\0\" \" \" < /proc/$0/cmdline)\"'"
    ))?;
    Ok(out.lines().map(String::from).collect())
}

/// examples/cgi/shell.cgi: a POST form, a client redirect, a custom Status,
/// the meta-variables, and a 50 MiB streamed response during which the
/// gateway's memory stays flat.
fn shell_script(m: &mut Machine) -> Result<()> {
    install_cgi(m)?;
    write_config(
        m,
        &format!(
            "[pool.shell]\nprotocol = \"cgi\"\nexec = \"{CGI_DIR}/shell.cgi\"\nroute = \"/cgi/shell\"\nmin = 2\naccess_log = true\n"
        ),
    )?;
    apply_and_route(m, "/cgi/shell/")?;
    assert_pool_running(m, "shell", 2)?;
    let unit = m.succeed("cat /etc/systemd/system/cgipool-shell@.service")?;
    ensure!(
        unit.contains("ExecStart=/usr/local/bin/cgipool cgi-gateway --route \"/cgi/shell\""),
        "the unit does not run the gateway:\n{unit}"
    );

    // POST form.
    let (code, headers, body) = request(
        m,
        "-d 'name=John+Doe&lang=sh' http://127.0.0.1/cgi/shell/form",
    )?;
    ensure!(code == 200, "POST form answered {code}: {body}");
    ensure!(
        body.contains("field name=John Doe") && body.contains("field lang=sh"),
        "the form fields did not reach the program:\n{body}"
    );
    ensure!(
        body.contains("content-type=application/x-www-form-urlencoded")
            && body.contains("content-length=21"),
        "CONTENT_TYPE/CONTENT_LENGTH wrong:\n{body}"
    );
    ensure!(
        header(&headers, "X-Cgipool-Worker").is_some_and(|w| w.starts_with("shell@")),
        "no X-Cgipool-Worker:\n{headers}"
    );
    let (code, _, body) = request(m, "http://127.0.0.1/cgi/shell/form")?;
    ensure!(
        code == 200 && body.contains("<form method=\"post\" action=\"/cgi/shell/form\">"),
        "GET form answered {code}: {body}"
    );

    // Client redirect.
    let (code, headers, _) = request(m, "http://127.0.0.1/cgi/shell/redirect")?;
    ensure!(code == 302, "redirect answered {code}:\n{headers}");
    ensure!(
        header(&headers, "Location") == Some("https://example.org/after-redirect"),
        "wrong Location:\n{headers}"
    );

    // Custom status, custom header.
    let (code, headers, body) = request(m, "http://127.0.0.1/cgi/shell/teapot")?;
    ensure!(
        code == 418 && body.contains("short and stout"),
        "teapot answered {code}: {body}"
    );
    ensure!(
        header(&headers, "X-Custom") == Some("kept"),
        "custom header lost:\n{headers}"
    );
    let (code, _, _) = request(m, "http://127.0.0.1/cgi/shell/nothing-here")?;
    ensure!(code == 404, "the program's Status: 404 became {code}");

    // Meta-variables (over TLS: HTTPS=on, port 443); httpoxy: no HTTP_PROXY.
    let (code, _, env) = request(
        m,
        "-k -H 'Proxy: http://evil:3128' -H 'X-Request-ID: ignored' 'https://127.0.0.1/cgi/shell/env?a=1&b=%41'",
    )?;
    ensure!(code == 200, "env answered {code}");
    for want in [
        "GATEWAY_INTERFACE=CGI/1.1",
        "SCRIPT_NAME=/cgi/shell",
        "PATH_INFO=/env",
        "QUERY_STRING=a=1&b=%41",
        "REQUEST_METHOD=GET",
        "REQUEST_URI=/cgi/shell/env?a=1&b=%41",
        "REMOTE_ADDR=127.0.0.1",
        "SERVER_NAME=127.0.0.1",
        "SERVER_PORT=443",
        "SERVER_PROTOCOL=HTTP/1.1",
        "HTTPS=on",
        "CGIPOOL_POOL=shell",
    ] {
        ensure!(
            env.lines().any(|l| l == want),
            "{want} missing from the program's environment:\n{env}"
        );
    }
    for bad in [
        "HTTP_PROXY=",
        "LISTEN_FDS=",
        "LISTEN_PID=",
        "NOTIFY_SOCKET=",
    ] {
        ensure!(
            !env.lines().any(|l| l.starts_with(bad)),
            "{bad} must not reach the program:\n{env}"
        );
    }

    // 50 MiB streamed: the gateway's peak RSS stays flat.
    let pid = m.unit_property("cgipool-shell@1.service", "MainPID")?;
    let pid2 = m.unit_property("cgipool-shell@2.service", "MainPID")?;
    let before = vm_hwm_kib(m, &pid)?.max(vm_hwm_kib(m, &pid2)?);
    let t = Instant::now();
    let out = m.succeed(
        "curl -sS -o /dev/null -w '%{http_code} %{size_download}' 'http://127.0.0.1/cgi/shell/big?mb=50'",
    )?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        out.trim() == "200 52428800",
        "50 MiB download gave {out:?} (code and bytes)"
    );
    let after = vm_hwm_kib(m, &pid)?.max(vm_hwm_kib(m, &pid2)?);
    println!(
        "cgi: 50 MiB streamed in {secs:.2}s; gateway peak RSS (VmHWM) {before} KiB before, {after} KiB after"
    );
    ensure!(
        after < before + 8 * 1024 && after < 32 * 1024,
        "gateway memory grew while streaming 50 MiB: VmHWM {before} → {after} KiB"
    );
    // A shared queue (the default) gets a connection per request from
    // nginx (an idle kept connection would tie the next request to the
    // worker that accepted it): the log line's conn=ID#N counts requests
    // per connection.
    m.succeed(
        "for i in $(seq 10); do curl -sf -o /dev/null http://127.0.0.1/cgi/shell/form; done",
    )?;
    let journal = m.journal("cgipool-shell@1.service")? + &m.journal("cgipool-shell@2.service")?;
    ensure!(
        journal.contains("GET /cgi/shell/big?mb=50 200 52428800B"),
        "no request log line for the big download:\n{journal}"
    );
    let most_on_one_conn = journal
        .lines()
        .filter_map(|l| {
            l.split(" conn=")
                .nth(1)?
                .split([' ', '#'])
                .nth(1)?
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    ensure!(
        most_on_one_conn == 1,
        "nginx sent a second request on a connection to a shared queue's gateway:\n{journal}"
    );
    println!("cgi: one request per nginx connection (shared queue)");
    let score =
        m.succeed("systemd-analyze security cgipool-shell@1.service --no-pager | tail -1")?;
    println!("cgi: {}", score.trim());
    Ok(())
}

/// Under load (the shared queue: a connection per request), a CGI pool scales up
/// and down, rolls (environment change) and loses a gateway to kill -9
/// without a failed request: a stopping gateway finishes its request and
/// says `Connection: close`, and nginx retries what a killed one dropped.
fn zero_failures_under_load(m: &mut Machine) -> Result<()> {
    install_cgi(m)?;
    let config = |env: &str| {
        format!(
            "[pool.ok]\nprotocol = \"cgi\"\nexec = \"{CGI_DIR}/misbehave.cgi\"\nroute = \"/cgi/ok\"\nmin = 2\nmax = 4\nenvironment = {{ ROUND = \"{env}\" }}\n"
        )
    };
    write_config(m, &config("1"))?;
    apply_and_route(m, "/cgi/ok/ok")?;
    assert_pool_running(m, "ok", 2)?;
    let mut load = Load::start(m, 8, 20, "http://127.0.0.1:80/cgi/ok/ok")?;
    // The pauses space the changes out over the load; nothing waits on them.
    std::thread::sleep(Duration::from_secs(2));
    load.step(m, "scale 2 -> 4", "cgipool scale ok 4")?;
    std::thread::sleep(Duration::from_secs(2));
    load.step(m, "scale 4 -> 2", "cgipool scale ok 2")?;
    write_config(m, &config("2"))?;
    load.step(
        m,
        "rolling restart (environment changed)",
        &format!("cgipool apply {CONFIG}"),
    )?;
    for n in [1, 2] {
        std::thread::sleep(Duration::from_millis(1500));
        load.step(
            m,
            &format!("kill -9 the gateway of ok@{n}"),
            &crate::machine::kill_main_pid(&format!("cgipool-ok@{n}.service")),
        )?;
    }
    load.finish(m, "cgi zero-failure load", 1_000)?;
    let journal = m.journal("cgipool-ok@1.service")?;
    ensure!(
        journal.contains("cgi-gateway: stopping"),
        "no gateway of ok@1 was stopped during the load:\n{journal}"
    );
    Ok(())
}

/// examples/cgi/misbehave.cgi: a hang with a background child and a setsid
/// grandchild gets 504 at the timeout and leaves no process; garbage gets
/// 502; the same worker keeps serving.
fn timeout_and_garbage(m: &mut Machine) -> Result<()> {
    install_cgi(m)?;
    write_config(
        m,
        &format!(
            "[pool.misbehave]\nprotocol = \"cgi\"\nexec = \"{CGI_DIR}/misbehave.cgi\"\nroute = \"/cgi/misbehave\"\nmin = 1\nmax = 1\nrequest_timeout = \"3s\"\n"
        ),
    )?;
    apply_and_route(m, "/cgi/misbehave/ok")?;
    assert_pool_running(m, "misbehave", 1)?;
    let unit = "cgipool-misbehave@1.service";
    let pid = m.unit_property(unit, "MainPID")?;

    let t = Instant::now();
    // nginx sets X-Request-ID (and tells the client which one it used).
    let (code, headers, body) = request(m, "http://127.0.0.1/cgi/misbehave/hang")?;
    let hang_id = header(&headers, "X-Request-ID")
        .context("no X-Request-ID from nginx")?
        .to_string();
    let took = t.elapsed().as_secs_f64();
    ensure!(code == 504, "the hanging program answered {code}: {body}");
    let most = m.scaled(Duration::from_secs(10)).as_secs_f64();
    ensure!(
        (2.5..most).contains(&took),
        "504 after {took:.1}s, expected about 3s (request_timeout; at most {most:.1}s, scaled)"
    );
    println!("cgi: hanging program answered 504 after {took:.2}s");
    let left = m.execute("pgrep -a -f 'sleep 100[123]'", Duration::from_secs(10))?;
    ensure!(
        left.rc != 0,
        "processes of the timed-out request survived:\n{}",
        left.stdout
    );
    let procs = cgroup_procs(m, unit)?;
    ensure!(
        procs.len() == 1 && procs[0].starts_with(&format!("{pid} ")),
        "the worker's cgroup holds more than the gateway: {procs:?}"
    );
    let journal = m.journal(unit)?;
    ensure!(
        journal.contains(&format!(
            "{hang_id} stderr: misbehave: hanging with children"
        )),
        "the program's stderr is not in the journal with its request id:\n{journal}"
    );
    ensure!(
        journal.contains(&format!("{hang_id} GET /cgi/misbehave/hang 504")),
        "no log line for the timed-out request:\n{journal}"
    );

    let (code, headers, body) = request(m, "http://127.0.0.1/cgi/misbehave/garbage")?;
    ensure!(code == 502, "garbage answered {code}: {body}");
    let garbage_id = header(&headers, "X-Request-ID").context("no X-Request-ID from nginx")?;
    let journal = m.journal(unit)?;
    ensure!(
        journal.contains(&format!(
            "{garbage_id} 502: the CGI program's response has no valid header block"
        )),
        "no reason logged for the 502:\n{journal}"
    );

    for _ in 0..3 {
        let (code, headers, body) = request(m, "http://127.0.0.1/cgi/misbehave/ok")?;
        ensure!(
            code == 200 && body.starts_with("ok from pid"),
            "after the hang and the garbage the worker answered {code}: {body}"
        );
        ensure!(
            header(&headers, "X-Cgipool-Worker") == Some("misbehave@1"),
            "{headers}"
        );
    }
    ensure!(
        m.unit_property(unit, "MainPID")? == pid && m.unit_property(unit, "NRestarts")? == "0",
        "the worker was restarted"
    );
    let procs = cgroup_procs(m, unit)?;
    ensure!(procs.len() == 1, "leftover processes: {procs:?}");
    Ok(())
}

/// A bare repository /srv/git/repo.git owned by the system user `git`, with
/// one commit, pushable over HTTP.
fn make_repo(m: &mut Machine) -> Result<()> {
    m.succeed(
        "set -e
         export HOME=/root
         useradd --system --home-dir /srv/git --shell /usr/sbin/nologin git
         install -d -o git -g git /srv/git
         git init -q --bare -b main /srv/git/repo.git
         git -C /srv/git/repo.git config http.receivepack true
         echo 'the test repository' > /srv/git/repo.git/description
         rm -rf /tmp/seed && git init -q -b main /tmp/seed
         echo hello > /tmp/seed/README
         git -C /tmp/seed add README
         git -C /tmp/seed -c user.name=Seed -c user.email=seed@example.org commit -q -m seed
         git -C /tmp/seed push -q /srv/git/repo.git main
         chown -R git:git /srv/git",
    )?;
    Ok(())
}

/// git clone, fetch and push over HTTP through nginx → cgipool →
/// git-http-backend, sandboxed with only `user` and `read_write_paths`
/// relaxed.
fn git_http_backend(m: &mut Machine) -> Result<()> {
    install_cgi(m)?;
    make_repo(m)?;
    write_config(
        m,
        "[pool.git]\nprotocol = \"cgi\"\nexec = \"/usr/lib/git-core/git-http-backend\"\nroute = \"/git\"\nmin = 2\naccess_log = true\nuser = \"git\"\nread_write_paths = [\"/srv/git\"]\nbody_limit = \"100m\"\nenvironment = { GIT_PROJECT_ROOT = \"/srv/git\", GIT_HTTP_EXPORT_ALL = \"1\" }\n",
    )?;
    apply_and_route(m, "/git/repo.git/info/refs")?;
    assert_pool_running(m, "git", 2)?;
    let git = "HOME=/root git -c user.name=Tester -c user.email=t@example.org";
    let url = "http://127.0.0.1/git/repo.git";
    m.succeed(&format!(
        "set -e; rm -rf /tmp/c1 /tmp/c2
         {git} clone -q {url} /tmp/c1
         test \"$(cat /tmp/c1/README)\" = hello
         {git} clone -q {url} /tmp/c2"
    ))?;
    // push a commit with a 3 MiB file (more than git's 1 MiB post buffer:
    // the client sends it chunked, nginx buffers it for the gateway).
    m.succeed(&format!(
        "set -e; cd /tmp/c1
         echo pushed > PUSHED
         head -c 3145728 /dev/urandom > blob.bin
         {git} add PUSHED blob.bin
         {git} commit -q -m 'pushed over http'
         {git} push -q origin main 2>&1"
    ))?;
    let head_c1 = m.succeed("git -C /tmp/c1 rev-parse HEAD")?;
    let head_srv = m.succeed("runuser -u git -- git -C /srv/git/repo.git rev-parse main")?;
    ensure!(
        head_c1 == head_srv,
        "the push did not reach the server: {head_c1} vs {head_srv}"
    );
    m.succeed(&format!(
        "set -e; cd /tmp/c2
         {git} fetch -q origin
         test \"$(git rev-parse origin/main)\" = {}
         {git} merge -q --ff-only origin/main
         test \"$(cat PUSHED)\" = pushed
         cmp blob.bin /tmp/c1/blob.bin",
        head_c1.trim()
    ))?;
    // fsck as the owner: what the gateway wrote is a sound repository.
    m.succeed("runuser -u git -- git -C /srv/git/repo.git fsck --no-progress 2>&1")?;
    let log = m.journal("cgipool-git@1.service")? + &m.journal("cgipool-git@2.service")?;
    for want in [
        "GET /git/repo.git/info/refs?service=git-upload-pack 200",
        "POST /git/repo.git/git-upload-pack 200",
        "POST /git/repo.git/git-receive-pack 200",
    ] {
        ensure!(
            log.contains(want),
            "no `{want}` in the workers' journal:\n{log}"
        );
    }
    for n in 1..=2 {
        ensure!(
            cgroup_procs(m, &format!("cgipool-git@{n}.service"))?.len() == 1,
            "leftover processes in git@{n}"
        );
    }
    println!("cgi: git clone, push (3 MiB) and fetch through nginx → cgipool → git-http-backend");
    Ok(())
}

/// gitweb.cgi (Perl) renders its project list.
fn gitweb(m: &mut Machine) -> Result<()> {
    install_cgi(m)?;
    make_repo(m)?;
    m.write_text(
        "/etc/cgipool/gitweb.conf",
        "our $projectroot = \"/srv/git\";\nour $site_name = \"cgipool gitweb\";\n",
    )?;
    write_config(
        m,
        "[pool.gitweb]\nprotocol = \"cgi\"\nexec = \"/usr/share/gitweb/gitweb.cgi\"\nroute = \"/gitweb\"\nmin = 1\nuser = \"git\"\nenvironment = { GITWEB_CONFIG = \"/etc/cgipool/gitweb.conf\" }\n",
    )?;
    apply_and_route(m, "/gitweb/")?;
    assert_pool_running(m, "gitweb", 1)?;
    let (code, headers, body) = request(m, "http://127.0.0.1/gitweb/")?;
    ensure!(
        code == 200,
        "gitweb answered {code}:\n{headers}\n{body}\n{}",
        m.journal("cgipool-gitweb@1.service")?
    );
    ensure!(
        header(&headers, "Content-Type")
            .is_some_and(|t| t.starts_with("application/xhtml+xml") || t.starts_with("text/html")),
        "gitweb's Content-Type:\n{headers}"
    );
    ensure!(
        body.contains("project_list")
            && body.contains("repo.git")
            && body.contains("the test repository"),
        "gitweb's project list does not show repo.git:\n{body}"
    );
    // A project page (PATH_INFO) and its summary.
    let (code, _, body) = request(m, "'http://127.0.0.1/gitweb/?p=repo.git;a=summary'")?;
    ensure!(
        code == 200 && body.contains("seed"),
        "gitweb summary answered {code}:\n{body}"
    );
    println!("cgi: gitweb.cgi lists repo.git and shows its summary");
    Ok(())
}
