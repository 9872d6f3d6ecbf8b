//! The rule-pack loader on any source: the first byte picks whether the text is a Rego rule
//! file added to the default pack (metadata contract, limits, static checks, smoke run) or one
//! of its list files replaced (`lists/*.yaml`, or `.json`). An error with diagnostics or a pack,
//! never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::defaults::DEFAULT_RULES;
use palisade::rules::pack::{PackOptions, PackSources, RulePack, SourceFile};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut sources = PackSources { root: Some("fuzz".into()), ..PackSources::default() };
    for (path, body) in DEFAULT_RULES {
        let file = SourceFile { path: path.to_string(), text: body.to_string() };
        if path.starts_with("lists/") {
            sources.lists.push(file);
        } else if path.ends_with(".rego") && !path.ends_with("_test.rego") {
            sources.policies.push(file);
        }
    }
    match which % 3 {
        0 => sources.policies.push(SourceFile { path: "fuzz.rego".into(), text: text.into() }),
        n => {
            // Replace one list, keeping its stem (the pack's rules refer to it).
            let index = (which as usize / 3) % sources.lists.len().max(1);
            if let Some(list) = sources.lists.get_mut(index) {
                let stem = list.path.rsplit_once('.').map_or(list.path.clone(), |(s, _)| s.to_string());
                list.path = format!("{stem}.{}", if n == 1 { "yaml" } else { "json" });
                list.text = text.into();
            }
        }
    }
    let _ = RulePack::from_sources(&sources, &PackOptions::default());
});
