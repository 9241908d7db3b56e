//! The reader of a worker's state report (src/worker_status.rs, compiled
//! from the very file): any StatusText, never a panic; a report it accepts
//! formats back into a line it reads the same way.
#![no_main]
#![allow(dead_code)]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/worker_status.rs"]
mod worker_status;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(report) = worker_status::parse(text) {
        let line = worker_status::format(&report);
        assert!(line.bytes().all(|b| (b' '..=b'~').contains(&b)), "{line:?}");
        let again = worker_status::parse(&line).expect("a formatted report reads back");
        assert_eq!(again.requests, report.requests);
        assert_eq!(again.current.is_some(), report.current.is_some());
    }
    let _ = worker_status::decode(text);
});
