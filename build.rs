//! Build script: records the git commit cgipool is built from, for
//! `cgipool --version`. Without git or a repository (a crate tarball), the
//! commit comes from `CGIPOOL_GIT_COMMIT` if set, else it reads "unknown".
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CGIPOOL_GIT_COMMIT");
    // Only this crate's own repository counts: an unpacked crate tarball
    // inside some other checkout must not report that checkout's commit.
    let own_repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".git")
        .exists();
    let commit = std::env::var("CGIPOOL_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| own_repo.then(|| git(&["rev-parse", "--short=12", "HEAD"]))?);
    // Rebuild when HEAD moves: HEAD itself (checkouts) and the branch it
    // names (commits), loose or packed. Worktrees keep HEAD in their own
    // git dir and refs in the common one.
    if !own_repo {
        println!(
            "cargo:rustc-env=CGIPOOL_GIT_COMMIT={}",
            commit.as_deref().unwrap_or("unknown")
        );
        return;
    }
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let (Some(common), Some(head_ref)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        println!("cargo:rerun-if-changed={common}/{head_ref}");
        println!("cargo:rerun-if-changed={common}/packed-refs");
    }
    println!(
        "cargo:rustc-env=CGIPOOL_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
