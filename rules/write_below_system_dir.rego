# 3. Writing below /etc, /bin, /sbin, /usr, /lib: images are built, not changed while running.
# Account and privilege files (passwd, shadow, sudoers, ld.so.preload, ...) raise high severity.
package palisade.rules.write_below_system_dir

import data.palisade.lib
import data.palisade.lib.open_path
import data.palisade.lib.chmod_path
import data.palisade.lib.unlink_path
import data.palisade.lib.rename_old_path
import data.palisade.lib.rename_new_path
import data.palisade.lists

meta := {
	"id": "write_below_system_dir",
	"title": "Write below a system directory",
	"severity": "medium",
	"mitre": ["T1222.002", "T1543", "T1098"],
	"action": "alert",
	"events": ["open", "rename", "unlink", "chmod"],
	"prefilter": {
		"open": [
			{"open.write": true, "open.path": {"path_prefix": lists.system_dirs}},
			{"open.create": true, "open.path": {"path_prefix": lists.system_dirs}},
			{"open.truncate": true, "open.path": {"path_prefix": lists.system_dirs}},
		],
		"rename": [
			{"rename.old_path": {"path_prefix": lists.system_dirs}},
			{"rename.new_path": {"path_prefix": lists.system_dirs}},
		],
		"unlink": [{"unlink.path": {"path_prefix": lists.system_dirs}}],
		"chmod": [{"chmod.path": {"path_prefix": lists.system_dirs}}],
	},
}

# The paths each kind of event changes (one rule per type, so an event only pays for its own).
changed := open_changed if input.type == "open"

else := rename_changed if input.type == "rename"

else := unlink_changed if input.type == "unlink"

else := chmod_changed if input.type == "chmod"

open_changed contains open_path if {
	input.type == "open"
	writes
}

rename_changed contains rename_new_path if input.type == "rename"

rename_changed contains rename_old_path if input.type == "rename"

unlink_changed contains unlink_path if input.type == "unlink"

chmod_changed contains chmod_path if {
	input.type == "chmod"
	input.chmod.path != ""
}

writes if input.open.write

writes if input.open.create

writes if input.open.truncate

verb := {
	"open": "wrote",
	"rename": "renamed",
	"unlink": "deleted",
	"chmod": "changed the mode of",
}[input.type]

result := input[input.type].result

alerts contains {"message": message(path), "severity": "high"} if {
	some path in changed
	system_path(path)
	not allowed(path)
	account_file(path)
}

alerts contains {"message": message(path), "severity": "medium"} if {
	some path in changed
	system_path(path)
	not allowed(path)
	not account_file(path)
}

message(path) := sprintf("%s (pid %d) %s %s%s", [input.process.comm, input.process.pid, verb, path, lib.outcome(result)])

system_path(path) if {
	strings.any_prefix_match(path, lists.system_dirs)
	some dir in lists.system_dirs
	startswith(path, concat("", [dir, "/"]))
}

allowed(path) if strings.any_prefix_match(path, lists.system_write_allowed)

account_file(path) if strings.any_prefix_match(path, lists.account_files)
