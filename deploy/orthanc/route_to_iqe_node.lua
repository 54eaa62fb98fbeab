-- Orthanc Lua routing: the alternative to the Python plugin. Every series that becomes
-- stable (no new instance for "StableAge" seconds) is sent to a standalone `iqe node`,
-- declared in "DicomModalities" as "iqe-node"; the node sends its SR / Parametric Map /
-- SC results back to this Orthanc by C-STORE ([destination] in node.toml).
-- Enable with  "LuaScripts": [ "/opt/iqe-engine/deploy/orthanc/route_to_iqe_node.lua" ]

function OnStableSeries(seriesId, tags, metadata)
   -- Results come back as new series; never route them to the node again.
   local description = tags['SeriesDescription'] or ''
   local modality = tags['Modality'] or ''
   if string.sub(description, 1, 3) == 'IQE' or modality == 'SR' then
      return
   end
   print('IQE: routing series ' .. (tags['SeriesInstanceUID'] or seriesId) .. ' to iqe-node')
   -- Asynchronous job in Orthanc's queue: retried by Orthanc if the node is down.
   SendToModality(seriesId, 'iqe-node')
end
