# 13. Shell history tampering: deleting, truncating or moving away history files to hide what
# was typed.
package palisade.rules.shell_history_tampering

import data.palisade.lib
import data.palisade.lib.open_path
import data.palisade.lib.unlink_path
import data.palisade.lib.rename_old_path
import data.palisade.lib.process_is_shell
import data.palisade.lists

meta := {
	"id": "shell_history_tampering",
	"title": "Shell history tampering",
	"severity": "medium",
	"mitre": ["T1070.003"],
	"action": "alert",
	"events": ["unlink", "open", "rename"],
	"prefilter": {
		"open": [{"open.truncate": true, "open.path": {"path_suffix": lists.history_files}}],
		"unlink": [{"unlink.path": {"path_suffix": lists.history_files}}],
		"rename": [{"rename.old_path": {"path_suffix": lists.history_files}}],
	},
}

# Both need the path to end with a listed name: one builtin call rules out most paths before
# the list is walked.
history_file(path) if {
	strings.any_suffix_match(path, lists.history_files)
	some name in lists.history_files
	endswith(path, concat("/", ["", name]))
}

history_file(path) if {
	strings.any_suffix_match(path, lists.history_files)
	some name in lists.history_files
	path == name
}

alerts contains {"message": msg} if {
	input.type == "unlink"
	path := unlink_path
	history_file(path)
	msg := sprintf("%s (pid %d) deleted shell history %s%s", [input.process.comm, input.process.pid, path, lib.outcome(input.unlink.result)])
}

# A shell rewriting its history file at the end of a session opens it with O_TRUNC and mode
# 0600 (bash's history save); a redirection (`: > ~/.bash_history`) uses 0666. Telling them
# apart keeps every interactive session from alerting on exit, at the price of missing
# `history -c; history -w` typed into the shell itself.
shell_saving_own_history if {
	input.open.mode == 384
	process_is_shell
}

alerts contains {"message": msg} if {
	input.type == "open"
	input.open.truncate
	path := open_path
	history_file(path)
	not shell_saving_own_history
	msg := sprintf("%s (pid %d) truncated shell history %s%s", [input.process.comm, input.process.pid, path, lib.outcome(input.open.result)])
}

alerts contains {"message": msg} if {
	input.type == "rename"
	path := rename_old_path
	history_file(path)
	msg := sprintf("%s (pid %d) moved shell history %s to %s%s", [
		input.process.comm, input.process.pid, path, input.rename.new_path, lib.outcome(input.rename.result),
	])
}
