# 6. Executing a file from a world-writable scratch directory: payloads are dropped there.
package palisade.rules.exec_from_tmp

import data.palisade.lib.exec_path
import data.palisade.lists

meta := {
	"id": "exec_from_tmp",
	"title": "Program executed from a temporary directory",
	"severity": "high",
	"mitre": ["T1204.002", "T1059"],
	"action": "alert",
	"events": ["exec"],
	"prefilter": {"exec": [
		{"exec.filename": {"path_prefix": lists.temp_dirs}},
		{"process.exe": {"prefix": lists.temp_dirs}},
	]},
}

alerts contains {"message": msg} if {
	some path in executed
	strings.any_prefix_match(path, lists.temp_dirs)
	msg := sprintf("executed %s from a writable temporary directory (%s)", [path, concat(" ", input.exec.argv)])
}

executed contains exec_path if input.exec.filename != ""

executed contains input.process.exe if {
	is_string(input.process.exe)
	input.process.exe != ""
}
