module tenx/front

go 1.22
