//! The gateway's request-head parser (src/cgi/http.rs, compiled from the
//! very file) and what runs on every head it accepts: body framing,
//! keep-alive, and the meta-variables with their path decoding
//! (src/cgi/meta.rs).
//!
//! Checked besides "no panic": a complete head is complete at its own end
//! (the accept loop may stop reading there), the accept loop's shortcut
//! (`may_be_complete`) never misses it, and no prefix of it is complete.
#![no_main]
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/cgi/http.rs"]
mod http;
#[path = "../../src/cgi/meta.rs"]
mod meta;

fuzz_target!(|data: &[u8]| {
    // The head limit (`--max-header-bytes`) varies with the first byte,
    // 256 B to 4 KiB, so inputs up to -max_len (4 KiB) reach "too large".
    let max = 256 * (1 + data.first().map_or(0, |&b| b as usize % 16));
    let Ok(Some((req, n))) = http::parse_head(data, max) else {
        return;
    };
    assert!(n > 0 && n <= data.len() && n <= max);
    assert!(http::may_be_complete(&data[..n], 0), "head end missed");
    let (again, m) = http::parse_head(&data[..n], max)
        .ok()
        .flatten()
        .expect("a complete head is complete at its end");
    assert_eq!((&again, m), (&req, n));
    // A shorter prefix is never complete (a byte-wise arrival finds the
    // same head, not an earlier one).
    let cut = n - 1 - (data[0] as usize % n.min(64));
    assert!(!matches!(http::parse_head(&data[..cut], max), Ok(Some(_))));
    let _ = http::keep_alive(&req);
    let length = match http::framing(&req) {
        Ok(http::Framing::Length(l)) => Some(l),
        Ok(_) => None,
        Err((status, _)) => {
            assert!((400..600).contains(&status));
            return;
        }
    };
    let cx = meta::Context {
        route: "/git",
        document_root: "/srv",
        program: "/usr/lib/cgi-bin/x",
    };
    if let Ok(vars) = meta::variables(&req, &cx, length) {
        // Decoded paths never carry NUL or a dot segment to the program.
        for (k, v) in &vars {
            assert!(!k.is_empty());
            if k == "PATH_INFO" {
                let v = v.as_encoded_bytes();
                assert!(!v.contains(&0));
                assert!(!v.split(|&b| b == b'/').any(|s| s == b".." || s == b"."));
            }
        }
    }
});
