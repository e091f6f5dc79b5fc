//! The TOML configuration: any text parses or fails cleanly; a file that
//! parses prints (`--print-config`) as TOML that parses again to the same
//! settings, and validation never panics.
#![no_main]

use corvid_registry::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml_str(text) else {
        return;
    };
    let _ = config.validate();
    let printed = toml::to_string_pretty(&config).expect("a parsed config prints");
    let again = Config::from_toml_str(&printed)
        .unwrap_or_else(|e| panic!("printed config does not parse: {e}\n{printed}"));
    let printed_again = toml::to_string_pretty(&again).expect("a parsed config prints");
    assert_eq!(
        printed, printed_again,
        "config changed in a print/parse round trip"
    );
});
