//! Policy and settings YAML: any text parses or reports errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Parsing reads secret files named in the document; keep the fuzzer away
    // from the filesystem (e.g. a blocking /dev/stdin).
    if text.contains("file") || text.contains('\\') {
        return;
    }
    let _ = pubwarden::policy::schema::parse(text);
    let _ = pubwarden::config::Settings::from_yaml(text, &Default::default());
});
